"""The GoT reasoning-chain format: prompt template, writer, tolerant parser and layout renderer.

A chain is free prose in which each planned object appears as
`<|obj_start|>NAME<|obj_end|> <|box_start|>(x1,y1),(x2,y2)<|box_end|>`, coordinates being integers in
0..1000 independent of the image size (GoT-R1's format). The parser never raises on model output: what it
cannot use is reported in `ParsedChain.problems`, because a reward must be able to score garbage as garbage.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Integral

from PIL import Image, ImageDraw, ImageFont

OBJ_START, OBJ_END, BOX_START, BOX_END = "<|obj_start|>", "<|obj_end|>", "<|box_start|>", "<|box_end|>"
GOT_TAGS = (OBJ_START, OBJ_END, BOX_START, BOX_END)
COORD_MAX = 1000
PROMPT_TEMPLATE = "Follow the caption to generate an image through a chain of thought process: {prompt}"

Box = tuple[int, int, int, int]


def chat_prompt(prompt: str) -> str:
    """The GoT-R1 user turn in Janus's `deepseek` SFT format (empty system prompt, empty assistant turn).

    The tokenizer adds BOS; the model continues with the chain and ends it with `<begin_of_image>`.
    """
    if not prompt or not prompt.strip():
        raise ValueError("empty prompt: a caption is required to plan an image")
    return f"<|User|>: {PROMPT_TEMPLATE.format(prompt=prompt.strip())}\n\n<|Assistant|>:"


@dataclass(frozen=True)
class ChainObject:
    name: str
    box: Box


@dataclass
class ParsedChain:
    objects: list[ChainObject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def box_problem(box: Sequence[int]) -> str | None:
    """Why `box` is not a valid GoT box, or None."""
    if len(box) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in box):
        return f"a box is four integers (x1, y1, x2, y2), got {tuple(box)!r}"
    x1, y1, x2, y2 = box
    if any(not 0 <= v <= COORD_MAX for v in box):
        return f"coordinates out of range 0..{COORD_MAX}: ({x1},{y1}),({x2},{y2})"
    if x1 > x2 or y1 > y2:
        return f"box corners reversed (need x1<=x2 and y1<=y2): ({x1},{y1}),({x2},{y2})"
    return None


def format_object(obj: ChainObject) -> str:
    x1, y1, x2, y2 = obj.box
    return f"{OBJ_START}{obj.name}{OBJ_END} {BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"


def format_chain(objects: Iterable[ChainObject], prose: Sequence[str] = ()) -> str:
    """Write a chain: `prose[i]` (if given) precedes object i, `prose[len(objects)]` closes the text.

    Invalid names or boxes raise: we only ever write chains that `parse_chain` reads back exactly.
    """
    objects = list(objects)
    for text in prose:
        if any(tag in text for tag in GOT_TAGS):
            raise ValueError(f"prose {text!r} must be free of GoT tags")
    parts: list[str] = []
    for i, obj in enumerate(objects):
        name = obj.name
        if not name or name != name.strip() or any(tag in name for tag in GOT_TAGS):
            raise ValueError(f"object name {name!r} must be non-empty, stripped and free of GoT tags")
        if (problem := box_problem(obj.box)) is not None:
            raise ValueError(f"object {name!r}: {problem}")
        if i < len(prose) and prose[i]:
            parts.append(prose[i])
        parts.append(format_object(obj))
    if len(prose) > len(objects) and prose[len(objects)]:
        parts.append(prose[len(objects)])
    return " ".join(parts)


_TAG_RE = re.compile(r"<\|(obj_start|obj_end|box_start|box_end)\|>")
_BOX_RE = re.compile(r"\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*")


def _coordinate(digits: str) -> int | None:
    """A matched coordinate (optional minus, digits) as an int, or None when too long to be in range: int() refuses
    over 4300 digits, leading zeros included, and model output may hold any run of them."""
    sign, digits = ("-", digits[1:]) if digits.startswith("-") else ("", digits)
    digits = digits.lstrip("0") or "0"
    return None if len(digits) > len(str(COORD_MAX)) else int(sign + digits)


def parse_chain(text: str) -> ParsedChain:
    """Read every well-formed object/box pair of `text`; everything else becomes a human-readable problem.

    A small state machine over the four tags: an object name must be closed, then followed by a box; a box
    must hold two integer points in 0..1000 with x1<=x2, y1<=y2. Objects with a problem are not returned.
    """
    out = ParsedChain()
    name_start: int | None = None  # char offset after an open <|obj_start|>
    box_start: int | None = None  # char offset after an open <|box_start|>
    pending: str | None = None  # a closed name waiting for its box
    for m in _TAG_RE.finditer(text):
        tag, pos = m.group(1), m.start()
        if tag == "obj_start":
            if name_start is not None:
                out.problems.append(f"unterminated {OBJ_START} at char {name_start - len(OBJ_START)}")
            if box_start is not None:
                out.problems.append(f"unterminated {BOX_START} at char {box_start - len(BOX_START)}")
                box_start = None
            if pending is not None:
                out.problems.append(f"object {pending!r} has no box")
                pending = None
            name_start = m.end()
        elif tag == "obj_end":
            if name_start is None:
                out.problems.append(f"stray {OBJ_END} at char {pos}")
                continue
            name = text[name_start:pos].strip()
            name_start = None
            if not name:
                out.problems.append(f"empty object name before char {pos}")
            else:
                pending = name
        elif tag == "box_start":
            if name_start is not None:
                out.problems.append(f"unterminated {OBJ_START} at char {name_start - len(OBJ_START)}")
                name_start = None
            if box_start is not None:
                out.problems.append(f"unterminated {BOX_START} at char {box_start - len(BOX_START)}")
            box_start = m.end()
        else:  # box_end
            if box_start is None:
                out.problems.append(f"stray {BOX_END} at char {pos}")
                continue
            body = text[box_start:pos]
            box_start = None
            label = pending if pending is not None else "<unnamed>"
            if pending is None:
                out.problems.append(f"box {body.strip()!r} at char {pos} has no object name before it")
                continue
            pending = None
            bm = _BOX_RE.fullmatch(body)
            if bm is None:
                out.problems.append(f"object {label!r}: malformed box {body.strip()!r}")
                continue
            coords = [_coordinate(v) for v in bm.groups()]
            if any(c is None for c in coords):
                out.problems.append(f"object {label!r}: coordinates out of range 0..{COORD_MAX}: "
                                    f"{body.strip()[:80]!r}")
                continue
            box = tuple(coords)
            if (problem := box_problem(box)) is not None:
                out.problems.append(f"object {label!r}: {problem}")
                continue
            out.objects.append(ChainObject(label, box))  # type: ignore[arg-type]
    if name_start is not None:
        out.problems.append(f"unterminated {OBJ_START} at char {name_start - len(OBJ_START)}")
    if box_start is not None:
        out.problems.append(f"unterminated {BOX_START} at char {box_start - len(BOX_START)}")
    if pending is not None:
        out.problems.append(f"object {pending!r} has no box")
    return out


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40)]


def to_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """0..1000 frame -> pixel corners of a `width` x `height` image."""
    x1, y1, x2, y2 = box
    return (round(x1 * width / COORD_MAX), round(y1 * height / COORD_MAX),
            round(x2 * width / COORD_MAX), round(y2 * height / COORD_MAX))


def draw_boxes(image: Image.Image, objects: Sequence[ChainObject], line_width: int | None = None) -> Image.Image:
    """Draw each box with its name at the top-left corner, in place, on `image` (any size)."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    lw = line_width or max(1, min(image.size) // 128)
    for i, obj in enumerate(objects):
        if (problem := box_problem(obj.box)) is not None:
            raise ValueError(f"object {obj.name!r}: {problem}")
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = to_pixels(obj.box, *image.size)
        # The box covers pixels x1..x2-1 (as the shapes renderer fills it): its outline is drawn on them, so a
        # full-frame box's right and bottom edges land on the image's last column and row, not past them.
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=lw)
        left, top, right, bottom = draw.textbbox((x1 + lw, y1 + lw), obj.name, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x1 + lw, y1 + lw), obj.name, fill=(255, 255, 255), font=font)
    return image


def render_layout(objects: Sequence[ChainObject], size: int | tuple[int, int] = 384) -> Image.Image:
    """The planned layout on a blank white canvas: what the spatial judge looks at (GoT-R1's R_spa)."""
    width, height = (size, size) if isinstance(size, int) else size
    return draw_boxes(Image.new("RGB", (width, height), (255, 255, 255)), objects)


OVERLAY_MIN_SIDE = 256  # smaller images (the shapes world's 64 px) are enlarged so the labels leave them visible


def layout_overlay(image: Image.Image, objects: Sequence[ChainObject]) -> Image.Image:
    """Side by side: the generated image with the planned boxes drawn over it | the layout alone."""
    image = image.convert("RGB")
    if min(image.size) == 0:
        raise ValueError(f"cannot draw a layout over an empty image ({image.width}x{image.height})")
    if min(image.size) < OVERLAY_MIN_SIDE:
        scale = -(-OVERLAY_MIN_SIDE // min(image.size))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    width, height = image.size
    panel = Image.new("RGB", (2 * width, height), (255, 255, 255))
    panel.paste(draw_boxes(image.copy(), objects), (0, 0))
    panel.paste(render_layout(objects, (width, height)), (width, 0))
    return panel
