import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from gotr1.chain import (
    BOX_END,
    BOX_START,
    GOT_TAGS,
    OBJ_END,
    OBJ_START,
    PALETTE,
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
    assert canvas.getpixel((99, 150)) != (255, 255, 255)  # right edge of the first box: its last column, 99
    assert canvas.getpixel((100, 150)) == (255, 255, 255)
    assert canvas.getpixel((50, 199)) != (255, 255, 255)  # its bottom edge, the canvas's last row
    assert canvas.getpixel((174, 160)) != (255, 255, 255)  # right edge of the second box (columns 150..174)
    assert canvas.getpixel((175, 160)) == (255, 255, 255)
    full = render_layout([ChainObject("all", (0, 0, 1000, 1000))], 64)  # every edge on the canvas
    assert all(full.getpixel(p) == PALETTE[0] for p in [(63, 40), (40, 63), (0, 40), (40, 0)])
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


# ------------------------------------------------------------------------------------------------ writer format
# The published format (GoT-R1's chains; `gotr1-anchors.md` §1), written out independently of `format_object`.
PUBLISHED_BOX_RE = re.compile(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>")


def test_format_chain_writes_the_published_format_exactly():
    """Pieces separated by one space, empty prose skipped (no double spaces), closing prose kept."""
    objs = [ChainObject("cat", (1, 2, 3, 4)), ChainObject("a dog", (5, 6, 1000, 8))]
    assert format_chain(objs, ["A", "", "end."]) == (
        "A <|obj_start|>cat<|obj_end|> <|box_start|>(1,2),(3,4)<|box_end|> "
        "<|obj_start|>a dog<|obj_end|> <|box_start|>(5,6),(1000,8)<|box_end|> end.")
    assert format_chain(objs[:1]) == "<|obj_start|>cat<|obj_end|> <|box_start|>(1,2),(3,4)<|box_end|>"
    assert format_chain([], ["just prose"]) == "just prose"


@settings(max_examples=60, deadline=None)
@given(st.lists(objects, max_size=5), st.lists(prose_text, max_size=6))
def test_written_boxes_match_the_published_regex(objs, prose):
    text = format_chain(objs, prose)
    assert [tuple(map(int, m.groups())) for m in PUBLISHED_BOX_RE.finditer(text)] == [o.box for o in objs]


def test_format_chain_refuses_names_and_prose_that_would_not_read_back():
    import pytest

    for name in ["", " cat", "cat ", "\tcat"]:  # the parser strips names: these would read back changed
        with pytest.raises(ValueError, match="non-empty, stripped"):
            format_chain([ChainObject(name, (0, 0, 5, 5))])
    with pytest.raises(ValueError, match="prose"):  # every prose piece is checked, not only the first
        format_chain([ChainObject("cat", (0, 0, 5, 5))], ["fine", f"bad {BOX_END}"])


# ------------------------------------------------------------------------------------------------ parser states
def test_interleaved_tags_report_exactly_what_broke_and_keep_the_next_object():
    """Each broken state of the tag machine gives its own problem; the following well-formed object survives."""
    cases = [
        # an object name left open by a new <|obj_start|>
        (f"{OBJ_START}cat{OBJ_START}dog{OBJ_END} {BOX_START}(1,2),(3,4){BOX_END}",
         [("dog", (1, 2, 3, 4))], ["unterminated <|obj_start|> at char 0"]),
        # a closed name followed by another object before its box
        (f"{OBJ_START}cat{OBJ_END} {OBJ_START}dog{OBJ_END} {BOX_START}(1,2),(3,4){BOX_END}",
         [("dog", (1, 2, 3, 4))], ["object 'cat' has no box"]),
        # a box left open by a new <|box_start|>: the second box belongs to the name
        (f"{OBJ_START}cat{OBJ_END} {BOX_START}(9,9),{BOX_START}(1,2),(3,4){BOX_END}",
         [("cat", (1, 2, 3, 4))], [f"unterminated <|box_start|> at char {len(OBJ_START + 'cat' + OBJ_END) + 1}"]),
        # a box opened inside an open name
        (f"{OBJ_START}cat {BOX_START}(1,2),(3,4){BOX_END}",
         [], ["unterminated <|obj_start|> at char 0", "box '(1,2),(3,4)' at char 0 has no object name before it"]),
        # an object opened inside an open box
        (f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2) {OBJ_START}dog{OBJ_END} {BOX_START}(5,6),(7,8){BOX_END}",
         [("dog", (5, 6, 7, 8))],
         [f"unterminated <|box_start|> at char {len(OBJ_START + 'cat' + OBJ_END) + 1}", "object 'cat' has no box"]),
        # reversed y only
        (f"{OBJ_START}cat{OBJ_END} {BOX_START}(2,500),(40,3){BOX_END}", [], None),
    ]
    for text, objs, problems in cases:
        parsed = parse_chain(text)
        assert [(o.name, o.box) for o in parsed.objects] == objs, text
        if problems is None:
            assert len(parsed.problems) == 1 and "reversed" in parsed.problems[0], parsed.problems
            continue
        # char offsets of box problems are where <|box_end|> sits
        expected = [p.replace("at char 0 has", f"at char {text.index(BOX_END)} has") for p in problems]
        assert parsed.problems == expected, (text, parsed.problems)


def test_coordinates_with_many_leading_zeros_never_raise():
    """int() refuses strings of over 4300 digits, leading zeros included: a model emitting a run of zeros must get a
    problem or its (small) value, never an exception out of the reward."""
    zeros = "0" * 5000
    parsed = parse_chain(f"{OBJ_START}cat{OBJ_END} {BOX_START}({zeros}5,-{zeros}),(10,{zeros}10){BOX_END}")
    assert parsed.problems == [] and parsed.objects == [ChainObject("cat", (5, 0, 10, 10))]
    parsed = parse_chain(f"{OBJ_START}cat{OBJ_END} {BOX_START}({zeros}10000,0),(10,10){BOX_END}")
    assert parsed.objects == [] and any("out of range" in p for p in parsed.problems)


# ------------------------------------------------------------------------------------------------ renderer geometry
def test_layout_of_a_non_square_canvas_scales_each_axis_by_its_own_side():
    canvas = render_layout([ChainObject("x", (0, 0, 1000, 500))], (100, 40))  # rows 0 .. 500 * 40/1000 - 1
    assert canvas.getpixel((50, 19)) != (255, 255, 255)
    assert canvas.getpixel((50, 20)) == (255, 255, 255)
    from PIL import Image

    panel = layout_overlay(Image.new("RGB", (100, 50), (0, 0, 0)), [])  # enlarged by ceil(256 / 50) = 6
    assert panel.size == (1200, 300)
