"""The exact judge of the shapes world: GoT-R1's four rewards computed by code, behind the `Judge` protocol.

* R_sem (prompt -> chain): Dice overlap of the object multisets the prompt requires and the chain names
  (`2 * matched / (required + named)`): missing objects, wrong colours/shapes/counts and extras all cost.
* R_spa (prompt -> planned layout): share of the prompt's objects present in the chain, times the mean of one check
  per stated relation (every planned subject/reference pair satisfies `relation_holds`) and one "objects do not
  overlap" check (share of planned pairs overlapping by at most 10% of the smaller box).
* R_RI (chain -> image): each planned object is matched one-to-one to a connected component of its colour in the
  image (greedy by IoU); mean IoU with its planned box, in the image's pixel grid; unmatched objects score 0.
* R_PI (prompt -> image): objects detected by colour segmentation and shape classification; the mean of one check
  per required object (`min/max` of detected and required counts) and one per relation (on the detected boxes),
  times `required / (required + extra objects)`. `exact_match` is every check passing with no extras: the
  per-category accuracy.

Every value is in [0, 1] and finite; an empty or garbled chain scores 0 where it must, never raises. A prompt
outside the shapes grammar raises `PromptParseError`: that is a bad input file, not bad model output.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from gotr1.chain import COORD_MAX, ChainObject, to_pixels
from gotr1.rewards.geometry import iou
from gotr1.rewards.protocol import COMPONENTS, RewardBreakdown, RewardSample
from gotr1.shapes.world import COLOURS, SHAPES, PromptSpec, group_relation_holds, parse_prompt

MAX_SIDE = 256  # larger images are analysed at this size (nearest-neighbour, so colours stay pure)
MIN_SATURATION = 0.4  # below: background or a faint blur fringe
MIN_VALUE = 0.3
HUE_TOLERANCE = 24.0  # degrees from the nearest palette hue (palette hues are >= 30 degrees apart)
SPLIT = 0.01  # a colour covering this much of the image inside a region is an object of its own (41 px at 64 x 64)
MIN_AREA = 0.005  # smallest object, as a fraction of the image (20 px at 64 x 64; a 12-px triangle has 84)
OVERLAP = 0.1  # planned boxes may share at most this fraction of the smaller one


def _hue_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel hue in degrees, saturation and value in [0, 1], for a `[H, W, 3]` uint8 array."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return hue * 60.0, np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0), mx


_PALETTE_NAMES = tuple(COLOURS)
_PALETTE_HUES = np.array([_hue_saturation_value(np.array([[c]], np.uint8))[0][0, 0] for c in COLOURS.values()])


def colour_classes(rgb: np.ndarray) -> np.ndarray:
    """`[H, W]` int8: 0 for background, i + 1 for the i-th palette colour (nearest hue, saturated pixels only)."""
    hue, sat, val = _hue_saturation_value(rgb)
    dist = np.abs(hue[..., None] - _PALETTE_HUES)
    dist = np.minimum(dist, 360.0 - dist)
    nearest = dist.argmin(-1)
    ok = (sat >= MIN_SATURATION) & (val >= MIN_VALUE) & (dist.min(-1) <= HUE_TOLERANCE)
    return np.where(ok, nearest + 1, 0).astype(np.int8)


def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero class: each pixel gets its component's smallest flat index
    (background gets H*W). Min-label propagation with pointer jumping, in numpy (no scipy dependency)."""
    h, w = classes.shape
    n = h * w
    lab = np.where(classes > 0, np.arange(n).reshape(h, w), n)
    same_v = (classes[1:] == classes[:-1]) & (classes[1:] > 0)
    same_h = (classes[:, 1:] == classes[:, :-1]) & (classes[:, 1:] > 0)
    while True:
        new = lab.copy()
        m = np.where(same_v, np.minimum(lab[1:], lab[:-1]), n)
        new[1:] = np.minimum(new[1:], m)
        new[:-1] = np.minimum(new[:-1], m)
        m = np.where(same_h, np.minimum(new[:, 1:], new[:, :-1]), n)
        new[:, 1:] = np.minimum(new[:, 1:], m)
        new[:, :-1] = np.minimum(new[:, :-1], m)
        flat = new.reshape(-1)
        fg = flat < n
        flat[fg] = flat[flat[fg]]  # a label is a pixel of the same component with a label <= it: jump to it
        if np.array_equal(new, lab):
            return lab
        lab = new


@dataclass(frozen=True)
class Detection:
    """One object found in an image: colour, classified shape, pixel box (x2/y2 exclusive), 0..1000 box, area."""

    colour: str
    shape: str
    pixel_box: tuple[int, int, int, int]
    box: tuple[float, float, float, float]
    area: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle from a component's mask cropped to its bounding box.

    A triangle (apex up) holds about a third of its pixels in the top half, a square or a circle a half; a square
    fills the four corner blocks of its box (each a quarter of the side), a circle leaves them mostly empty. Both
    features hold on blurred VQ reconstructions (5th/95th percentiles: triangle top mass <= 0.37, others >= 0.46;
    circle corners <= 0.47, square corners >= 0.62 on 800 reconstructed objects).
    """
    h, w = mask.shape
    rows = mask.sum(1).astype(np.float64)
    centres = np.arange(h) + 0.5
    top = (rows * np.where(centres < h / 2, 1.0, np.where(centres == h / 2, 0.5, 0.0))).sum() / max(rows.sum(), 1)
    if top < 0.42:
        return "triangle"
    k = max(1, round(min(h, w) / 4))
    corners = (mask[:k, :k].mean() + mask[:k, -k:].mean() + mask[-k:, :k].mean() + mask[-k:, -k:].mean()) / 4
    return "square" if corners >= 0.55 else "circle"


def _prepare(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.NEAREST)
    return np.asarray(image)


def _components(labels: np.ndarray, background: int) -> tuple[np.ndarray, ...]:
    """(label ids, areas, x1, y1, x2, y2) of every component in `labels` (x2/y2 exclusive). `background` is the
    label of no component: the whole image's H*W, also in a crop of it (whose own size is no sentinel there)."""
    h, w = labels.shape
    fg = labels != background
    ys, xs = np.nonzero(fg)
    ids, inverse, areas = np.unique(labels[fg], return_inverse=True, return_counts=True)
    x1, y1 = np.full(len(ids), w), np.full(len(ids), h)
    x2, y2 = np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=np.int64)
    np.minimum.at(x1, inverse, xs)
    np.minimum.at(y1, inverse, ys)
    np.maximum.at(x2, inverse, xs + 1)
    np.maximum.at(y2, inverse, ys + 1)
    return ids, areas, x1, y1, x2, y2


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """Objects: connected saturated regions of at least `MIN_AREA` of the image, each of its majority colour.

    A region is split by colour only where a second colour covers at least `SPLIT` of the image in it (two objects
    touching); smaller off-colour parts (a decoder's hue fringe along an edge) stay part of the object.
    """
    rgb = _prepare(image) if isinstance(image, Image.Image) else image
    h, w = rgb.shape[:2]
    classes = colour_classes(rgb)
    regions = label_components((classes > 0).astype(np.int8))
    if not (regions < h * w).any():
        return []
    single = None  # single-colour components, computed only if some region needs splitting
    min_area = MIN_AREA * h * w
    out = []

    def add(mask: np.ndarray, colour: int, x1: int, y1: int, x2: int, y2: int, area: int) -> None:
        box = (x1 * COORD_MAX / w, y1 * COORD_MAX / h, x2 * COORD_MAX / w, y2 * COORD_MAX / h)
        out.append(Detection(_PALETTE_NAMES[colour - 1], classify_shape(mask), (int(x1), int(y1), int(x2), int(y2)),
                             tuple(float(v) for v in box), int(area)))

    for label, area, x1, y1, x2, y2 in zip(*_components(regions, h * w)):
        if area < min_area:
            continue
        mask = regions[y1:y2, x1:x2] == label
        counts = np.bincount(classes[y1:y2, x1:x2][mask], minlength=len(_PALETTE_NAMES) + 1)
        major = [c for c in range(1, len(counts)) if counts[c] >= max(SPLIT * h * w, min_area)]
        if len(major) <= 1:
            add(mask, int(major[0]) if major else int(counts[1:].argmax() + 1), x1, y1, x2, y2, area)
            continue
        if single is None:
            single = label_components(classes)
        inside = np.where(mask, single[y1:y2, x1:x2], h * w)
        for sub, sub_area, sx1, sy1, sx2, sy2 in zip(*_components(inside, h * w)):
            colour = int(classes[y1:y2, x1:x2].reshape(-1)[np.argmax(inside.reshape(-1) == sub)])
            if sub_area >= min_area and colour in major:
                add(inside[sy1:sy2, sx1:sx2] == sub, colour, x1 + sx1, y1 + sy1, x1 + sx2, y1 + sy2, sub_area)
    return out


def object_name(name: str) -> tuple[str, str] | None:
    """(colour, shape) of a chain object name such as 'red circle' or 'the red circles'; None if not one."""
    words = [w for w in name.lower().replace(",", " ").split() if w not in ("a", "an", "the", "one")]
    if len(words) != 2 or words[0] not in COLOURS:
        return None
    shape = words[1][:-1] if words[1].endswith("s") and words[1][:-1] in SHAPES else words[1]
    return (words[0], shape) if shape in SHAPES else None


# ------------------------------------------------------------------------------------------- components
def _named(objects: Sequence[ChainObject]) -> list[tuple[str | None, ChainObject]]:
    return [(" ".join(n) if (n := object_name(o.name)) else None, o) for o in objects]


def semantic_score(spec: PromptSpec, objects: Sequence[ChainObject]) -> float:
    """R_sem: Dice overlap of required and planned object multisets (unknown names count as extras)."""
    required = spec.counts()
    planned = Counter(name for name, _ in _named(objects))
    matched = sum(min(c, planned[name]) for name, c in required.items())
    return 2 * matched / (sum(required.values()) + sum(planned.values()))


def _overlap_ok(a: Sequence[float], b: Sequence[float]) -> bool:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter <= OVERLAP * smaller


def spatial_score(spec: PromptSpec, objects: Sequence[ChainObject]) -> float:
    """R_spa: presence of the required objects in the plan x mean(relation checks, no-overlap check)."""
    required = spec.counts()
    named = _named(objects)
    planned = Counter(name for name, _ in named)
    presence = sum(min(c, planned[name]) for name, c in required.items()) / sum(required.values())
    checks = []
    for r in spec.relations:
        a, b = spec.objects[r.subject].name, spec.objects[r.reference].name
        checks.append(float(group_relation_holds(r.relation, [o.box for n, o in named if n == a],
                                                 [o.box for n, o in named if n == b])))
    pairs = [(p.box, q.box) for i, p in enumerate(objects) for q in objects[i + 1:]]
    checks.append(sum(_overlap_ok(p, q) for p, q in pairs) / len(pairs) if pairs else 1.0)
    return presence * sum(checks) / len(checks)


def grounding_score(objects: Sequence[ChainObject], detections: Sequence[Detection], width: int,
                    height: int) -> float:
    """R_RI: mean IoU (pixel grid) between each planned box and the same-colour region matched to it, one-to-one."""
    if not objects:
        return 0.0
    planned = [to_pixels(o.box, width, height) for o in objects]
    colours = [n[0] if (n := object_name(o.name)) else None for o in objects]
    pairs = sorted(((iou(planned[i], d.pixel_box), i, j) for i in range(len(objects))
                    for j, d in enumerate(detections) if d.colour == colours[i]), reverse=True)
    best = [0.0] * len(objects)
    used_p, used_d = set(), set()
    for value, i, j in pairs:
        if value > 0 and i not in used_p and j not in used_d:
            best[i] = value
            used_p.add(i)
            used_d.add(j)
    return sum(best) / len(objects)


def image_checks(spec: PromptSpec, detections: Sequence[Detection]) -> tuple[list[float], int]:
    """R_PI's checks (per required object min/max of counts, per relation on the detected boxes) and the number
    of detected objects the prompt does not ask for."""
    required = spec.counts()
    found = Counter(d.name for d in detections)
    checks = [min(c, found[n]) / max(c, found[n]) for n, c in required.items()]
    for r in spec.relations:
        a, b = spec.objects[r.subject].name, spec.objects[r.reference].name
        checks.append(float(group_relation_holds(r.relation, [d.box for d in detections if d.name == a],
                                                 [d.box for d in detections if d.name == b])))
    return checks, sum(c for n, c in found.items() if n not in required)


# ------------------------------------------------------------------------------------------------ judge
@dataclass
class Verdict:
    """Everything the judge concluded about one sample (for tables, overlays and debugging)."""

    prompt: str
    category: str
    R_PI: float
    R_sem: float
    R_spa: float
    R_RI: float
    exact_match: bool
    detections: list[Detection] = field(default_factory=list)


@dataclass
class ShapesJudge:
    """Exact programmatic judge for the shapes world (`Judge` protocol: `score(samples) -> RewardBreakdown`)."""

    def verdict(self, sample: RewardSample) -> Verdict:
        spec = parse_prompt(sample.prompt)
        rgb = _prepare(sample.pixels())
        detections = detect_objects(rgb)
        objects = sample.chain.objects
        checks, extras = image_checks(spec, detections)
        return Verdict(
            prompt=sample.prompt, category=spec.category,
            R_PI=sum(checks) / len(checks) * spec.total / (spec.total + extras), R_sem=semantic_score(spec, objects),
            R_spa=spatial_score(spec, objects), R_RI=grounding_score(objects, detections, rgb.shape[1], rgb.shape[0]),
            exact_match=extras == 0 and all(c == 1.0 for c in checks), detections=detections)

    def verdicts(self, samples: Sequence[RewardSample]) -> list[Verdict]:
        return [self.verdict(s) for s in samples]

    def score(self, samples: Sequence[RewardSample]) -> RewardBreakdown:
        return breakdown(self.verdicts(samples))

    def exact_match(self, sample: RewardSample) -> bool:
        """The image shows exactly the required objects (colours, shapes, counts, nothing else) in the stated
        relations: T2I-CompBench-style accuracy."""
        return self.verdict(sample).exact_match


def breakdown(verdicts: Sequence[Verdict]) -> RewardBreakdown:
    """Stack verdicts into the protocol's `RewardBreakdown` (no judge answer is ever unparsable here)."""
    return RewardBreakdown(**{c: torch.tensor([getattr(v, c) for v in verdicts], dtype=torch.float32)
                              for c in COMPONENTS})


def summarise(verdicts: Sequence[Verdict], combination: str = "product") -> dict[str, dict[str, float]]:
    """Per-category and overall means of each component, of the total reward and the exact-match accuracy."""
    from gotr1.rewards.combine import combine

    groups: dict[str, list[Verdict]] = {}
    for v in verdicts:
        groups.setdefault(v.category, []).append(v)
    groups["overall"] = list(verdicts)
    out = {}
    for name, vs in groups.items():
        if not vs:
            continue
        b = breakdown(vs)
        row = {c: float(getattr(b, c).mean()) for c in COMPONENTS}
        row["total"] = float(combine(b.as_matrix(), combination).mean())  # type: ignore[arg-type]
        row["accuracy"] = sum(v.exact_match for v in vs) / len(vs)
        row["n"] = len(vs)
        out[name] = row
    return out
