"""The exact shapes judge: 1.0 on ground truth, exact values on constructed cases, lower on every corruption."""
import math
import random
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gotr1.chain import ChainObject, ParsedChain, format_chain
from gotr1.rewards.protocol import Judge, RewardSample
from gotr1.shapes.judge import (
    ShapesJudge,
    classify_shape,
    detect_objects,
    label_components,
    object_name,
    summarise,
)
from gotr1.shapes.render import render_objects, render_scene, shape_mask
from gotr1.shapes.world import CATEGORIES, SHAPES, PromptParseError, gt_chain, sample_scene, scene_for_prompt

JUDGE = ShapesJudge()


def sample(prompt, objects, image):
    """A RewardSample whose chain lists `objects` = [(name, box)] and whose image is `image`."""
    chain = format_chain([ChainObject(n, b) for n, b in objects])
    return RewardSample.from_text(prompt, chain, image)


def draw(objects, size=64):
    """Render [(name, box)] pairs ('red circle' -> colour red, shape circle)."""
    return render_objects([(*n.split(), b) for n, b in objects], size)


def test_is_a_judge():
    assert isinstance(JUDGE, Judge)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**9), category=st.sampled_from(CATEGORIES), size=st.sampled_from([64, 96, 128]))
def test_ground_truth_chain_and_image_score_one(seed, category, size):
    scene = sample_scene(random.Random(seed), category)
    s = RewardSample.from_text(scene.prompt, gt_chain(scene), render_scene(scene, size))
    v = JUDGE.verdict(s)
    assert (v.R_PI, v.R_sem, v.R_spa, v.R_RI, v.exact_match) == (1.0, 1.0, 1.0, 1.0, True), scene.prompt
    assert sorted(d.name for d in v.detections) == sorted(o.name for o in scene.objects)


LEFT = [("red circle", (63, 375, 313, 625)), ("blue square", (563, 375, 813, 625))]


def test_swapped_relation():
    swapped = [(LEFT[0][0], LEFT[1][1]), (LEFT[1][0], LEFT[0][1])]
    prompt = "a red circle left of a blue square"
    v = JUDGE.verdict(sample(prompt, swapped, draw(LEFT)))
    assert v.R_sem == 1.0 and v.R_spa == 0.5 and v.R_RI == 0.0  # plan swapped, image right: they disagree
    v = JUDGE.verdict(sample(prompt, swapped, draw(swapped)))
    assert v.R_RI == 1.0 and v.R_PI == pytest.approx(2 / 3) and not v.exact_match  # image follows the bad plan


def test_wrong_colour():
    prompt = "a red circle left of a blue square"
    wrong = [("green circle", LEFT[0][1]), LEFT[1]]
    v = JUDGE.verdict(sample(prompt, wrong, draw(LEFT)))
    assert v.R_sem == 0.5  # Dice: 1 of 2 required named, 1 of 2 named required
    assert v.R_spa == 0.25  # half present x mean(relation fails, no overlap)
    assert v.R_RI == 0.5  # no green region for the green circle
    v = JUDGE.verdict(sample(prompt, LEFT, draw(wrong)))
    assert v.R_PI == pytest.approx(1 / 3 * 2 / 3)  # red missing, relation unmet, one extra object
    assert not v.exact_match


TWO_ABOVE = [("green triangle", (188, 188, 375, 375)), ("green triangle", (500, 188, 688, 375)),
             ("yellow circle", (313, 500, 563, 750))]


def test_wrong_count_and_missing_objects():
    prompt = "two green triangles above a yellow circle"
    full = JUDGE.verdict(sample(prompt, TWO_ABOVE, draw(TWO_ABOVE)))
    assert (full.R_PI, full.R_sem, full.R_spa, full.R_RI, full.exact_match) == (1.0, 1.0, 1.0, 1.0, True)
    one = TWO_ABOVE[1:]
    v = JUDGE.verdict(sample(prompt, one, draw(one)))
    assert v.R_sem == pytest.approx(0.8) and v.R_spa == pytest.approx(2 / 3) and v.R_RI == 1.0
    assert v.R_PI == pytest.approx(2.5 / 3) and not v.exact_match
    v = JUDGE.verdict(sample(prompt, TWO_ABOVE, draw(TWO_ABOVE[:2])))  # the circle is not drawn
    assert v.R_RI == pytest.approx(2 / 3) and v.R_PI == pytest.approx(1 / 3) and not v.exact_match
    extra = TWO_ABOVE + [("red square", (750, 750, 938, 938))]
    v = JUDGE.verdict(sample(prompt, extra, draw(extra)))
    assert v.R_sem == pytest.approx(6 / 7) and v.R_PI == pytest.approx(3 / 4) and not v.exact_match


def test_empty_chain_and_blank_image():
    prompt = "two green triangles above a yellow circle"
    v = JUDGE.verdict(RewardSample(prompt, ParsedChain(), draw(TWO_ABOVE), ""))
    assert (v.R_sem, v.R_spa, v.R_RI, v.R_PI) == (0.0, 0.0, 0.0, 1.0)
    v = JUDGE.verdict(sample(prompt, TWO_ABOVE, Image.new("RGB", (64, 64), "white")))
    assert (v.R_PI, v.R_RI, v.exact_match) == (0.0, 0.0, False)
    scores = JUDGE.score([RewardSample.from_text(prompt, "no boxes at all <|obj_start|>", draw([]))])
    assert scores.as_matrix().tolist() == [[0.0, 0.0, 0.0, 0.0]] and scores.unparsable == dict.fromkeys(
        scores.unparsable, 0)


def test_grounding_is_exact_iou_on_constructed_images():
    image = np.full((64, 64, 3), 255, np.uint8)
    image[8:24, 8:24] = (225, 25, 25)  # red square, pixels [8, 24)
    image[40:56, 40:56][shape_mask("circle", (0, 0, 1000, 1000), 16, 16)] = (30, 70, 230)
    image[40:50, 0:10] = (225, 25, 25)  # a second, smaller red region that must not steal the match
    planned = [("red square", (250, 125, 500, 375)),  # pixels (16, 8, 32, 24): IoU 128 / 384 with the square
               ("blue circle", (625, 625, 875, 875)),  # pixels (40, 40, 56, 56): exact
               ("green triangle", (0, 0, 200, 200))]  # nothing green: 0
    v = JUDGE.verdict(sample("a red square, a blue circle and a green triangle", planned, Image.fromarray(image)))
    assert v.R_RI == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_components_reach_the_protocol_in_order():
    prompt = "a red circle left of a blue square"
    scores = JUDGE.score([sample(prompt, LEFT, draw(LEFT)), sample(prompt, LEFT[:1], draw(LEFT[1:]))])
    assert scores.R_sem.tolist() == pytest.approx([1.0, 2 / 3])
    assert scores.as_matrix().shape == (2, 4) and scores.R_PI.dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), w=st.integers(1, 300), h=st.integers(1, 300),
       mode=st.sampled_from(["RGB", "RGBA", "L", "P"]), n=st.integers(0, 6))
def test_garbage_scores_stay_in_range(seed, w, h, mode, n):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    names = ["red circle", "blue squares", "purple", "green triangle", "a yellow circle", "cat"]
    objects = [(names[int(rng.integers(len(names)))], tuple(int(v) for v in np.sort(rng.integers(0, 1001, 4))))
               for _ in range(n)]
    objects = [(nm, (b[0], b[1], b[2], b[3])) for nm, b in objects]
    text = format_chain([ChainObject(nm, b) for nm, b in objects if b[0] <= b[2] and b[1] <= b[3]])
    scores = JUDGE.score([RewardSample.from_text("two green triangles above a yellow circle", text, image)])
    m = scores.as_matrix()
    assert torch.isfinite(m).all() and ((m >= 0) & (m <= 1)).all()


def test_bad_prompt_raises():
    with pytest.raises(PromptParseError, match="zebra"):
        JUDGE.score([sample("a zebra", LEFT, draw(LEFT))])


def _bfs_components(classes):
    h, w = classes.shape
    comp = -np.ones((h, w), int)
    n = 0
    for y in range(h):
        for x in range(w):
            if classes[y, x] == 0 or comp[y, x] >= 0:
                continue
            comp[y, x] = n
            queue = deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and comp[ny, nx] < 0 and classes[ny, nx] == classes[cy, cx]:
                        comp[ny, nx] = n
                        queue.append((ny, nx))
            n += 1
    return comp


def _canonical(labels, background):
    seen = {}
    return np.array([-1 if v == background else seen.setdefault(v, len(seen)) for v in labels.reshape(-1)])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), h=st.integers(1, 20), w=st.integers(1, 20), k=st.integers(1, 3))
def test_component_labelling_matches_breadth_first_search(seed, h, w, k):
    classes = np.random.default_rng(seed).integers(0, k + 1, (h, w)).astype(np.int8)
    labels = label_components(classes)
    assert (_canonical(labels, h * w) == _canonical(_bfs_components(classes), -1)).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cells", [3, 4, 5])
def test_shapes_are_classified_from_their_masks(shape, cells):
    box = (0, 0, round(cells * 62.5), round(cells * 62.5))
    for size in (64, 128):
        mask = shape_mask(shape, box, size, size)
        ys, xs = np.nonzero(mask)
        assert classify_shape(mask[: ys.max() + 1, : xs.max() + 1]) == shape
    dets = detect_objects(render_objects([("orange", shape, (500, 500, 500 + box[2], 500 + box[3]))]))
    assert [d.name for d in dets] == [f"orange {shape}"]


def test_object_names():
    assert object_name("red circle") == ("red", "circle")
    assert object_name("The Green Triangles") == ("green", "triangle")
    assert object_name("red") is None and object_name("big red circle") is None and object_name("cat") is None


def test_summary_per_category():
    scene = scene_for_prompt("two red circles", random.Random(0))
    good = RewardSample.from_text(scene.prompt, gt_chain(scene), render_scene(scene))
    bad = RewardSample.from_text("a red circle left of a blue square", "", draw([]))
    table = summarise(JUDGE.verdicts([good, bad]))
    assert set(table) == {"counting", "spatial", "overall"}
    assert table["counting"]["accuracy"] == 1.0 and table["counting"]["total"] == pytest.approx(2.0)
    assert table["spatial"]["total"] == 0.0 and table["overall"]["n"] == 2
    assert math.isclose(table["overall"]["R_sem"], 0.5)


# ------------------------------------------------------------------------------------------- mutation review
def test_plans_overlap_against_the_smaller_box():
    """R_spa's no-overlap check: at most 10% of the *smaller* box may be shared (a box inside a big one fails)."""
    from gotr1.shapes.judge import spatial_score
    from gotr1.shapes.world import parse_prompt

    spec = parse_prompt("a red circle and a blue square")
    assert spatial_score(spec, [ChainObject("red circle", (0, 0, 900, 900)),
                                ChainObject("blue square", (100, 100, 300, 300))]) == 0.0
    circle = ChainObject("red circle", (0, 0, 200, 200))
    assert spatial_score(spec, [circle, ChainObject("blue square", (180, 0, 380, 200))]) == 1.0  # exactly 10%
    assert spatial_score(spec, [circle, ChainObject("blue square", (179, 0, 379, 200))]) == 0.0


def test_a_single_object_scores_one_on_ground_truth():
    scene = scene_for_prompt("a red circle", random.Random(0))
    v = JUDGE.verdict(RewardSample.from_text(scene.prompt, gt_chain(scene), render_scene(scene)))
    assert (v.R_PI, v.R_sem, v.R_spa, v.R_RI, v.exact_match) == (1.0, 1.0, 1.0, 1.0, True)


def test_grounding_matches_each_detected_region_once():
    """Two planned red circles, one drawn: the second plan may not reuse the region the first matched."""
    from gotr1.shapes.judge import grounding_score

    drawn, missing = (0, 0, 500, 500), (250, 0, 750, 500)  # IoU 1/3 with the drawn one
    detections = detect_objects(draw([("red circle", drawn)]))
    assert len(detections) == 1
    plan = [ChainObject("red circle", drawn), ChainObject("red circle", missing)]
    assert grounding_score(plan, detections, 64, 64) == pytest.approx((1.0 + 0.0) / 2)


def test_drawing_too_many_costs_like_drawing_too_few():
    three = [("green triangle", (0, 0, 250, 250)), ("green triangle", (375, 0, 625, 250)),
             ("green triangle", (750, 0, 1000, 250))]
    v = JUDGE.verdict(sample("two green triangles", three[:2], draw(three)))
    assert v.R_PI == pytest.approx(2 / 3) and not v.exact_match  # min/max of the counts: 2 of 3


def test_every_unrequested_object_is_an_extra():
    drawn = [("red circle", (0, 0, 250, 250)), ("blue square", (500, 0, 750, 250)),
             ("blue square", (500, 500, 750, 750))]
    v = JUDGE.verdict(sample("a red circle", drawn[:1], draw(drawn)))
    assert v.R_PI == pytest.approx(1 / (1 + 2)) and not v.exact_match


def test_boxes_are_read_per_axis_on_non_square_images():
    from gotr1.shapes.world import COLOURS

    image = np.full((64, 128, 3), 255, np.uint8)
    image[16:48, 32:64] = COLOURS["red"]
    (found,) = detect_objects(Image.fromarray(image))
    assert found.pixel_box == (32, 16, 64, 48) and found.box == (250.0, 250.0, 500.0, 750.0)
    v = JUDGE.verdict(sample("a red square", [("red square", (250, 250, 500, 750))], Image.fromarray(image)))
    assert (v.R_PI, v.R_RI, v.exact_match) == (1.0, 1.0, True)


def test_off_palette_hues_and_specks_are_background():
    from gotr1.shapes.world import COLOURS

    image = np.full((64, 64, 3), 255, np.uint8)
    image[8:24, 8:24] = (0, 200, 200)  # cyan, hue 180: 39 degrees from green, 48 from blue (tolerance 24)
    image[40:42, 40:42] = COLOURS["red"]  # 4 px, under MIN_AREA (20 px at 64 x 64)
    assert detect_objects(Image.fromarray(image)) == []


def test_a_fringe_of_a_third_colour_below_split_is_no_object():
    """Two touching objects are split by colour; a third colour covering less than SPLIT (41 px at 64 x 64) of the
    image inside the region is a fringe, not an object, even at an object's size (25 px >= MIN_AREA)."""
    from gotr1.shapes.world import COLOURS

    image = np.full((64, 64, 3), 255, np.uint8)
    image[8:24, 8:24] = COLOURS["red"]
    image[8:24, 24:40] = COLOURS["blue"]
    image[24:29, 8:13] = COLOURS["orange"]
    assert sorted(d.name for d in detect_objects(Image.fromarray(image))) == ["blue square", "red square"]


@pytest.mark.parametrize("size", [384, 512])
def test_ground_truth_scores_one_when_analysed_downscaled(size):
    """Above MAX_SIDE (256) the judge analyses a nearest-neighbour reduction: colours stay pure, so box edges
    stay where they were drawn."""
    for i in range(10):
        scene = sample_scene(random.Random(f"downscaled-{i}"), CATEGORIES[i % len(CATEGORIES)])
        v = JUDGE.verdict(RewardSample.from_text(scene.prompt, gt_chain(scene), render_scene(scene, size)))
        assert (v.R_PI, v.R_RI, v.exact_match) == (1.0, 1.0, True), scene.prompt


@pytest.mark.parametrize("top", [0, 8, 40])
def test_touching_objects_of_two_colours_are_both_found_anywhere(top):
    """A region of two touching colours is split into its objects wherever it lies. (The split used to read its
    crop's labels, which are whole-image pixel indices, against the crop's own size as the background label:
    below the image's first rows both objects vanished.)"""
    from gotr1.shapes.world import COLOURS

    image = np.full((64, 64, 3), 255, np.uint8)
    image[top:top + 16, 8:24] = COLOURS["red"]
    image[top:top + 16, 24:40] = COLOURS["blue"]
    found = sorted((d.name, d.pixel_box) for d in detect_objects(Image.fromarray(image)))
    assert found == [("blue square", (24, top, 40, top + 16)), ("red square", (8, top, 24, top + 16))]


def test_a_plan_drawn_with_touching_objects_scores_one():
    touching = [("red square", (125, 250, 375, 500)), ("blue square", (375, 250, 625, 500))]
    v = JUDGE.verdict(sample("a red square left of a blue square", touching, draw(touching)))
    assert (v.R_PI, v.R_sem, v.R_RI, v.exact_match) == (1.0, 1.0, 1.0, True)
    assert v.R_spa == 1.0  # no overlap: the boxes share an edge only
