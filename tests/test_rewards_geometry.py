import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from gotr1.rewards.geometry import iou, judge_frame, judge_to_got, mean_iou


def _raster_iou(a, b, size=64):
    """Oracle: count pixels of integer boxes on a grid."""
    grid_a = np.zeros((size, size), bool)
    grid_b = np.zeros((size, size), bool)
    grid_a[a[1]:a[3], a[0]:a[2]] = True
    grid_b[b[1]:b[3], b[0]:b[2]] = True
    union = (grid_a | grid_b).sum()
    return (grid_a & grid_b).sum() / union if union else 0.0


def test_iou_on_constructed_boxes():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150
    assert iou((0, 0, 10, 10), (2, 2, 4, 4)) == 4 / 100
    assert iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0  # no area: 0, not NaN
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


box = st.tuples(st.integers(0, 63), st.integers(0, 63), st.integers(0, 63), st.integers(0, 63)).map(
    lambda t: (min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3])))


@settings(max_examples=80, deadline=None)
@given(box, box)
def test_iou_matches_pixel_counting(a, b):
    assert iou(a, b) == pytest.approx(_raster_iou(a, b), abs=1e-12)
    assert iou(a, b) == iou(b, a)


def test_mean_iou_counts_missing_objects_as_zero():
    planned = [(0, 0, 100, 100), (500, 500, 600, 600), (0, 0, 10, 10)]
    found = [(0, 0, 100, 100), None, (0, 0, 5, 10)]
    assert mean_iou(planned, found) == pytest.approx((1 + 0 + 0.5) / 3)
    assert mean_iou([], []) == 0.0
    with pytest.raises(ValueError, match="2 planned boxes but 1"):
        mean_iou(planned[:2], found[:1])


def test_judge_to_got_is_exact_on_constructed_boxes():
    assert judge_to_got((0, 0, 392, 392), 392, 392) == (0, 0, 1000, 1000)
    assert judge_to_got((98, 196, 294, 392), 392, 392) == (250, 500, 750, 1000)
    assert judge_to_got((28, 14, 56, 28), 56, 28) == (500, 500, 1000, 1000)  # non-square frame
    assert judge_to_got((-20, -1, 500, 9999), 392, 392) == (0, 0, 1000, 1000)  # clamped to the image
    with pytest.raises(ValueError, match="positive size"):
        judge_to_got((0, 0, 1, 1), 0, 10)


@pytest.mark.parametrize("width, height", [(384, 384), (300, 200), (1000, 57), (56, 56), (641, 479)])
def test_judge_frame_is_the_processors_smart_resize(width, height):
    """The frame Qwen answers in is the processor's resized image: `grid * patch_size` == transformers' smart_resize."""
    processor = Qwen2VLImageProcessorPil()
    grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0].tolist()
    resized_h, resized_w = smart_resize(height, width, factor=28, min_pixels=processor.size["shortest_edge"],
                                        max_pixels=processor.size["longest_edge"])
    assert judge_frame(grid, 14) == (resized_w, resized_h)
    # a box covering the middle half of the resized image is the middle half in GoT's frame, whatever the size
    box = (resized_w / 4, resized_h / 4, 3 * resized_w / 4, 3 * resized_h / 4)
    assert judge_to_got(box, *judge_frame(grid, 14)) == pytest.approx((250, 250, 750, 750))
