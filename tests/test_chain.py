import string

from hypothesis import given, settings
from hypothesis import strategies as st

from gotr1.chain import (
    BOX_END,
    BOX_START,
    GOT_TAGS,
    OBJ_END,
    OBJ_START,
    ChainObject,
    chat_prompt,
    format_chain,
    layout_overlay,
    parse_chain,
    render_layout,
)

coord = st.integers(0, 1000)


@st.composite
def boxes(draw):
    x1, x2 = sorted((draw(coord), draw(coord)))
    y1, y2 = sorted((draw(coord), draw(coord)))
    return (x1, y1, x2, y2)


names = st.text(string.ascii_letters + string.digits + " -'()", min_size=1, max_size=20).map(str.strip).filter(bool)
objects = st.builds(ChainObject, names, boxes())
prose_text = st.text(string.ascii_letters + " ,.:;()\n", max_size=40)


@settings(max_examples=150, deadline=None)
@given(st.lists(objects, max_size=8), st.lists(prose_text, max_size=9))
def test_round_trip(objs, prose):
    parsed = parse_chain(format_chain(objs, prose))
    assert parsed.objects == objs
    assert parsed.problems == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab (),-0123456789") + list(GOT_TAGS)), max_size=120).map("".join))
def test_garbage_never_raises_and_keeps_only_valid_objects(text):
    parsed = parse_chain(text)
    for obj in parsed.objects:
        x1, y1, x2, y2 = obj.box
        assert 0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000
        assert obj.name and not any(t in obj.name for t in GOT_TAGS)


@settings(max_examples=100, deadline=None)
@given(st.lists(objects, min_size=1, max_size=5), st.data())
def test_truncated_chain_reports_problem(objs, data):
    text = format_chain(objs)
    cut = data.draw(st.integers(1, len(text) - 1))
    truncated = text[:cut]
    parsed = parse_chain(truncated)
    assert parsed.objects == objs[: truncated.count(BOX_END)]
    # an object whose start tag survived but whose box did not is reported, never silently dropped
    assert bool(parsed.problems) == (truncated.count(OBJ_START) > truncated.count(BOX_END))


def test_real_looking_chain_with_prose_parses_five_boxes():
    text = (
        "The image shows a sunny park. On the left a "
        f"{OBJ_START}red bicycle{OBJ_END} {BOX_START}(37,182),(405,763){BOX_END} leans against a "
        f"{OBJ_START}wooden bench{OBJ_END} {BOX_START}(300,500),(700,800){BOX_END}. Above them, a "
        f"{OBJ_START}yellow kite{OBJ_END} {BOX_START}(504,92),(699,298){BOX_END} flies; two children, "
        f"{OBJ_START}a boy{OBJ_END} {BOX_START}(720,400),(850,900){BOX_END} and "
        f"{OBJ_START}a girl{OBJ_END} {BOX_START}(860,420),(997,997){BOX_END}, watch it.<begin_of_image>"
    )
    parsed = parse_chain(text)
    assert parsed.problems == []
    assert [o.name for o in parsed.objects] == ["red bicycle", "wooden bench", "yellow kite", "a boy", "a girl"]
    assert parsed.objects[0].box == (37, 182, 405, 763)
    assert parsed.objects[4].box == (860, 420, 997, 997)


def test_each_problem_is_reported():
    cases = {
        f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3){BOX_END}": "malformed box",
        f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3,1001){BOX_END}": "out of range",
        f"{OBJ_START}cat{OBJ_END} {BOX_START}(500,2),(3,40){BOX_END}": "reversed",
        f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3,4)": "unterminated <|box_start|>",
        f"{OBJ_START}cat": "unterminated <|obj_start|>",
        f"{OBJ_START}cat{OBJ_END} and then nothing": "has no box",
        f"{BOX_START}(1,2),(3,4){BOX_END}": "no object name",
        f"{OBJ_START} {OBJ_END} {BOX_START}(1,2),(3,4){BOX_END}": "empty object name",
        f"stray {OBJ_END}": "stray",
        f"{OBJ_START}cat{OBJ_END} {BOX_START}(-1,2),(3,4){BOX_END}": "out of range",
    }
    for text, expected in cases.items():
        parsed = parse_chain(text)
        assert parsed.objects == [], text
        assert any(expected in p for p in parsed.problems), (text, parsed.problems)


def test_format_chain_rejects_invalid_objects():
    import pytest

    with pytest.raises(ValueError, match="out of range"):
        format_chain([ChainObject("cat", (0, 0, 1001, 5))])
    with pytest.raises(ValueError, match="reversed"):
        format_chain([ChainObject("cat", (10, 0, 5, 5))])
    with pytest.raises(ValueError, match="GoT tags"):
        format_chain([ChainObject(f"a{OBJ_END}", (0, 0, 5, 5))])


def test_chat_prompt_template_and_empty_prompt():
    import pytest

    assert chat_prompt(" a cat ") == (
        "<|User|>: Follow the caption to generate an image through a chain of thought process: a cat"
        "\n\n<|Assistant|>:")
    with pytest.raises(ValueError, match="empty prompt"):
        chat_prompt("   ")


def test_layout_renderer_draws_boxes_where_planned():
    objs = [ChainObject("left", (0, 0, 500, 1000)), ChainObject("dot", (750, 750, 875, 875))]
    canvas = render_layout(objs, 200)
    assert canvas.size == (200, 200)
    assert canvas.getpixel((199, 10)) == (255, 255, 255)  # outside every box: blank
    assert canvas.getpixel((100, 199)) != (255, 255, 255)  # bottom edge of the first box
    assert canvas.getpixel((160, 175)) != (255, 255, 255)  # right edge of the second box
    empty = render_layout([], (64, 32))
    assert empty.size == (64, 32) and empty.getextrema() == ((255, 255),) * 3
    from PIL import Image

    panel = layout_overlay(Image.new("RGB", (300, 260), (0, 0, 0)), objs)
    assert panel.size == (600, 260)
    small = layout_overlay(Image.new("RGB", (64, 64), (0, 0, 0)), objs)  # enlarged 4x so labels fit beside it
    assert small.size == (512, 256) and small.getpixel((255, 128)) == (0, 0, 0)


# ------------------------------------------------------------------------------------------------ bad input
def test_parse_never_raises_on_a_huge_coordinate():
    """Python refuses int() of over 4300 digits; the parser must report it, not raise."""
    text = f"{OBJ_START}cat{OBJ_END} {BOX_START}({'9' * 5000},0),(1,1){BOX_END}"
    parsed = parse_chain(text)
    assert parsed.objects == [] and any("out of range" in p for p in parsed.problems)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=60), st.sampled_from(GOT_TAGS))
def test_format_chain_refuses_prose_that_would_not_read_back(prose, tag):
    import pytest

    objs = [ChainObject("cat", (0, 0, 5, 5))]
    with pytest.raises(ValueError, match="prose"):
        format_chain(objs, [prose + tag])


def test_format_chain_refuses_non_integer_boxes():
    import pytest

    for box in [(0.5, 0, 10, 10), (True, 0, 10, 10), (0, 0, 10), ("0", 0, 10, 10)]:
        with pytest.raises(ValueError, match="box"):
            format_chain([ChainObject("cat", box)])  # type: ignore[arg-type]


def test_drawing_an_invalid_box_says_which_object():
    import pytest
    from PIL import Image

    for box, message in [((500, 500, 10, 10), "reversed"), ((0, 0, 1001, 5), "out of range")]:
        with pytest.raises(ValueError, match=f"'cat'.*{message}"):
            render_layout([ChainObject("cat", box)], 16)
    with pytest.raises(ValueError, match="empty image"):
        layout_overlay(Image.new("RGB", (0, 0)), [])
    # degenerate but valid: a point, a line, the whole canvas, on a 1-pixel image
    for box in [(500, 500, 500, 500), (0, 10, 1000, 10), (0, 0, 1000, 1000)]:
        assert render_layout([ChainObject("x", box)], 1).size == (1, 1)
        assert render_layout([ChainObject("猫🐱", box)], 8).getextrema() != ((255, 255),) * 3


unicode_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s == s.strip() and s and not any(t in s for t in GOT_TAGS))
unicode_prose = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).filter(
    lambda s: not any(t in s for t in GOT_TAGS))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.builds(ChainObject, unicode_names, boxes()), max_size=4), st.lists(unicode_prose, max_size=5))
def test_round_trip_with_any_unicode_names_and_prose(objs, prose):
    parsed = parse_chain(format_chain(objs, prose))
    assert parsed.objects == objs and parsed.problems == []
