"""Boxes for R_RI: the judge's pixel frame -> GoT's 0..1000 frame, IoU, and the per-sample mean IoU.

Qwen2.5-VL grounds in absolute pixel coordinates *of the image it was fed*, i.e. after its image processor's
`smart_resize` (sides rounded to multiples of patch_size * merge_size = 28 and clamped to the pixel budget), not of
the original image. That frame is exactly `image_grid_thw[1:] * patch_size`, so `judge_frame` reads it from the grid
the processor returned. The GoT frame is relative (0..1000 on both axes whatever the aspect ratio), and resizing an
image maps relative coordinates onto themselves, so `x_got = x_judge * 1000 / judge_width` (same for y) is exact
for any original size.
"""
from __future__ import annotations

from collections.abc import Sequence

from gotr1.chain import COORD_MAX

Box = tuple[float, float, float, float]


def judge_frame(grid_thw: Sequence[int], patch_size: int) -> tuple[int, int]:
    """(width, height) in pixels of the image the judge saw, from the processor's `image_grid_thw` row (t, h, w)."""
    _, h, w = (int(v) for v in grid_thw)
    return w * patch_size, h * patch_size


def judge_to_got(box: Box, width: int, height: int) -> Box:
    """A pixel box in a `width` x `height` judge frame -> the 0..1000 frame, clamped to the image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"judge frame must have a positive size, got {width}x{height}")
    x1, y1, x2, y2 = box
    sx, sy = COORD_MAX / width, COORD_MAX / height

    def clamp(v: float) -> float:
        return min(max(v, 0.0), float(COORD_MAX))

    return clamp(x1 * sx), clamp(y1 * sy), clamp(x2 * sx), clamp(y2 * sy)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes; 0 when the union has no area (no NaN)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mean_iou(planned: Sequence[Sequence[float]], found: Sequence[Sequence[float] | None]) -> float:
    """R_RI of one sample: mean IoU over planned objects, an object the judge did not ground counting 0.

    A chain without objects scores 0: nothing planned means nothing the image can be checked against.
    """
    if len(planned) != len(found):
        raise ValueError(f"{len(planned)} planned boxes but {len(found)} grounding results")
    if not planned:
        return 0.0
    return sum(iou(p, f) if f is not None else 0.0 for p, f in zip(planned, found)) / len(planned)
