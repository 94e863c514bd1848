"""Reward-curve PNGs: trailing means and what gets drawn."""
import math

import numpy as np
from PIL import Image

from gotr1.chain import PALETTE
from gotr1.plot import plot_curves, trailing_mean


def test_trailing_mean_skips_nan_and_keeps_the_window():
    out = trailing_mean([math.nan, 1.0, 3.0, math.nan, 5.0, 7.0], 2)
    assert math.isnan(out[0])
    assert out[1:] == [1.0, 2.0, 2.0, 4.0, 6.0]


def test_long_runs_draw_raw_values_faint_under_the_trend(tmp_path):
    series = {"mean": [0.5 + 0.3 * (-1) ** i + i / 400 for i in range(200)], "other": [math.nan] * 200}
    path = plot_curves(series, tmp_path / "c.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colour = np.array(PALETTE[0])
    faint = colour + (255 - colour) * 3 // 4
    assert (pixels == colour).all(1).sum() > 200  # the trend line (and its legend swatch)
    assert (pixels == faint).all(1).sum() > 200  # the raw zig-zag behind it


def test_short_runs_draw_the_values_themselves(tmp_path):
    path = plot_curves({"loss": [3.0, 2.0, 1.0]}, tmp_path / "c.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colour = np.array(PALETTE[0])
    assert (pixels == colour + (255 - colour) * 3 // 4).all(1).sum() == 0
    assert (pixels == colour).all(1).sum() > 100


def test_infinite_points_are_skipped_like_nan(tmp_path):
    """One inf must not stretch the axis over every finite point (nor label it "inf"): drawn as if it were NaN."""
    assert trailing_mean([1.0, math.inf, 3.0, -math.inf], 2) == [1.0, 1.0, 2.0, 2.0]
    for short in (True, False):
        base = [0.1, 0.2, 0.3, 0.25] * (1 if short else 50)
        with_inf, with_nan = list(base), list(base)
        with_inf[1], with_nan[1] = math.inf, math.nan
        a = np.asarray(Image.open(plot_curves({"r": with_inf}, tmp_path / "inf.png")))
        b = np.asarray(Image.open(plot_curves({"r": with_nan}, tmp_path / "nan.png")))
        assert (a == b).all()
