"""What the server sends: JSON samples (chain, boxes, base64 PNGs, tokens) and the server-sent-event stream.

Stream protocol (`text/event-stream`), per request:
  `token`  {"sample", "id", "text"}: one per reasoning id, in order, `<begin_of_image>` last (its text is any
           remainder); the `text` pieces of a sample concatenate to its chain text.
  `boxes`  {"sample", "chain", "boxes", "problems"}: once the sample's chain is complete (before its image).
  `image`  {"sample", "image"?, "layout"?}: base64 PNGs, when the request asked for them.
  `done`   the non-streaming response without the images; or `error` {"error", "status"} if the request failed
           (`status`: the HTTP status a non-streaming request would have been answered with).
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Sequence

from PIL import Image

from engine.outputs import GroupOutput, SampleOutput
from gotr1.chain import ParsedChain, layout_overlay, parse_chain
from gotr1.model import JanusBundle

RETURNABLE = ("chain", "boxes", "image", "layout", "tokens")
IMAGE_PARTS = ("image", "layout")


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def boxes_json(chain: ParsedChain) -> dict:
    return {"boxes": [{"name": o.name, "box": list(o.box)} for o in chain.objects], "problems": chain.problems}


def encode_images(output: GroupOutput, images: list[Image.Image], returns: Sequence[str]) -> list[dict[str, str]]:
    """Per sample, the requested PNGs (the image; the layout drawn over and beside it) as base64."""
    parts = []
    for s, image in zip(output.samples, images, strict=True):
        d = {}
        if "image" in returns:
            d["image"] = png_b64(image)
        if "layout" in returns:
            d["layout"] = png_b64(layout_overlay(image, s.chain.objects))
        parts.append(d)
    return parts


def sample_json(index: int, s: SampleOutput, returns: Sequence[str], images: dict[str, str] | None = None) -> dict:
    d: dict = {"index": index}
    if "chain" in returns:
        d["chain"] = s.reasoning_text
        d["boi_forced"] = s.boi_forced
    if "boxes" in returns:
        d.update(boxes_json(s.chain))
    if "tokens" in returns:
        d["reasoning_ids"] = list(s.reasoning_ids)
        d["image_tokens"] = s.image_tokens.tolist()
    d.update(images or {})
    return d


def response_json(output: GroupOutput, *, seed: int, returns: Sequence[str], timing: dict[str, float],
                  images: list[dict[str, str]] | None = None) -> dict:
    images = images or [None] * len(output.samples)
    return {"id": output.request_id, "seed": seed, "prompt": output.prompt,
            "samples": [sample_json(i, s, returns, im) for i, (s, im) in enumerate(zip(output.samples, images))],
            "timing": timing}


class IncrementalDetokenizer:
    """Text pieces of a growing id sequence (vLLM's incremental detokenization): decode a short window ending at
    the new id and emit what it adds to the window's text. A trailing U+FFFD is an unfinished multi-byte
    character: held back until the next ids complete it, so pieces never split a character. For a byte-level
    BPE the pieces concatenate to `decode(ids)`."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start; end of the ids already turned into text

    def push(self, token_id: int, final: bool = False) -> str:
        """The text `token_id` completes (possibly ""); `final` flushes whatever is held back."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if final or (len(text) > len(prefix_text) and not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""


class StreamState:
    """One streaming request: turns the engine's reasoning ids into `token` and `boxes` events.

    `bundle` must own a tokenizer that no other thread uses (the engine thread encodes prompts with its own).
    """

    def __init__(self, bundle: JanusBundle, n: int):
        self.bundle = bundle
        self.detok = [IncrementalDetokenizer(bundle.decode_text) for _ in range(n)]
        self.texts = [""] * n
        self.chains: list[ParsedChain | None] = [None] * n

    def tokens(self, new_ids: list[tuple[int, list[int]]]) -> str:
        out = []
        for i, ids in new_ids:
            for tok in ids:
                if self.chains[i] is not None:
                    raise RuntimeError(f"sample {i} got token {tok} after its <begin_of_image>")
                boi = tok == self.bundle.boi_id
                piece = self.detok[i].push(tok, final=boi)
                self.texts[i] += piece
                out.append(sse("token", {"sample": i, "id": tok, "text": piece}))
                if boi:
                    self.chains[i] = parse_chain(self.texts[i])
                    out.append(sse("boxes", {"sample": i, "chain": self.texts[i], **boxes_json(self.chains[i])}))
        return "".join(out)

    def catch_up(self, output: GroupOutput) -> str:
        """Events for any reasoning id the progress events did not carry yet (normally none)."""
        return self.tokens([(i, s.reasoning_ids[len(d.ids):]) for i, (s, d) in
                            enumerate(zip(output.samples, self.detok)) if len(s.reasoning_ids) > len(d.ids)])
