"""Reward curves as a PNG, drawn with PIL alone (no plotting dependency for one chart)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from gotr1.chain import PALETTE


def plot_curves(series: dict[str, list[float]], path: str | Path, title: str = "reward",
                size: tuple[int, int] = (720, 420)) -> Path:
    """One line per named series over the step index (long runs: faint raw values under a trailing mean);
    non-finite points (NaN, inf) are skipped, axes labelled with the range."""
    width, height = size
    left, right, top, bottom = 60, 150, 30, 40
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    values = [v for s in series.values() for v in s if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    steps = max((len(s) for s in series.values()), default=1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + plot_w * (i / max(steps - 1, 1))
        return x, top + plot_h * (1 - (v - lo) / (hi - lo))

    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=(0, 0, 0))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - frac)
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((4, y - 6), f"{lo + frac * (hi - lo):.3g}", fill=(0, 0, 0), font=font)
    draw.text((left, height - bottom + 8), "step 1", fill=(0, 0, 0), font=font)
    draw.text((left + plot_w - 40, height - bottom + 8), f"step {steps}", fill=(0, 0, 0), font=font)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    window = steps // 20  # GRPO rewards are noisy step to step: a trailing mean over 5% of the run shows the trend
    for k, (name, s) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        points = [xy(i, v) for i, v in enumerate(s) if math.isfinite(v)]
        if len(points) > 1 and window > 1:
            draw.line(points, fill=tuple(c + (255 - c) * 3 // 4 for c in colour), width=1)  # raw, faint
            points = [xy(i, v) for i, v in enumerate(trailing_mean(s, window)) if not math.isnan(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points if len(points) == 1 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        ly = top + 16 * k
        draw.line((width - right + 10, ly + 6, width - right + 30, ly + 6), fill=colour, width=3)
        draw.text((width - right + 36, ly), name, fill=(0, 0, 0), font=font)
    path = Path(path)
    image.save(path)
    return path


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` finite values at each step (NaN until one is seen)."""
    out, recent = [], []
    for v in values:
        if math.isfinite(v):
            recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out
