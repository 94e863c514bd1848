import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gotr1.rewards.parsing import expected_score, parse_box, parse_score, scale_score


@pytest.mark.parametrize("text, expected", [
    ("7", 7.0),
    (" 8/10 ", 8.0),
    ("Score: 9.", 9.0),
    ("10", 10.0),
    ('{"score": 6}', 6.0),
    ('{"score": "4"}', 4.0),
    ('{"reasoning": "the cat is left {of} the dog", "score": 3}', 3.0),
    ('```json\n{"description": "x", "caption": "y", "reasoning": "z", "score": 8}\n```', 8.0),
    ('Sure! Here is my rating: {"score": 5} because the dog is missing.', 5.0),
    ('{"evaluation": {"score": 2}}', 2.0),
    ('{"score": 7', 7.0),  # cut at max_new_tokens
    ("{'score': 1}", 1.0),  # Python-style quotes
    ('{"score": 7.5}', 7.5),
    ('"score": 1e1', 10.0),  # an exponent, as JSON allows, in a truncated answer: not 1
    ("Score: 8.5e-1", 0.85),
])
def test_parse_score_reads_the_judges_answer_shapes(text, expected):
    assert parse_score(text, 0, 10) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "garbage", "I would say three", "7 out of 12 objects 3", '{"score": null}', '{"score": true}',
    '{"score": "high"}', '{"score": 11}', '"score": 2e1', '{"score": "1e9"}',
    '{"score": -1}', "NaN", '{"score": NaN}', '{"note": 5}', "[1, 2, 3]",
    "{{{{", "]]]][[[[",
])
def test_parse_score_rejects_garbage_and_out_of_range(text):
    assert parse_score(text, 0, 10) is None


def test_parse_score_respects_the_scale():
    assert parse_score('{"score": 0}', 0, 10) == 0.0
    assert parse_score('{"score": 0}', 1, 10) is None  # R_spa is 1..10
    assert parse_score('{"score": 1}', 1, 10) == 1.0


@pytest.mark.parametrize("text, box", [
    ('```json\n[\n\t{"bbox_2d": [135, 114, 316, 272], "label": "cat"}\n]\n```', (135, 114, 316, 272)),
    ('{"bbox_2d": [1, 2, 3, 4]}', (1, 2, 3, 4)),
    ('[{"label": "cat", "bbox": [10.5, 20, 30, 40]}, {"bbox_2d": [0, 0, 1, 1]}]', (10.5, 20, 30, 40)),
    ("[5, 6, 7, 8]", (5, 6, 7, 8)),
    ('The cat is at [40, 30, 10, 20] in the image.', (10, 20, 40, 30)),  # reversed corners: same rectangle
    ('[{"bbox_2d": [11, 12, 13, 14], "label": "ca', (11, 12, 13, 14)),  # truncated answer
    ("the box is (3,4),(50,60)", (3, 4, 50, 60)),
    ('{"box": ["1", "2", "3", "4"]}', (1, 2, 3, 4)),
])
def test_parse_box_reads_qwen_grounding_answers(text, box):
    assert parse_box(text) == tuple(float(v) for v in box)


@pytest.mark.parametrize("text", [
    "", "no cat here", '{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": [1, 2, 3, "x"]}', '{"bbox_2d": [1, 2, 3, true]}',
    '[{"bbox_2d": [1, 2, 3', "[[[[[[", '{"label": "cat"}',
])
def test_parse_box_rejects_garbage(text):
    assert parse_box(text) is None


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('{}[]()":,.0123456789-+ scoreabx_2dlN\n\t\'')) | st.characters(),
               max_size=80))
def test_parsers_never_raise_and_stay_in_range(text):
    score = parse_score(text, 1, 10)
    assert score is None or (1 <= score <= 10 and math.isfinite(score))
    box = parse_box(text)
    assert box is None or (len(box) == 4 and box[0] <= box[2] and box[1] <= box[3]
                           and all(math.isfinite(v) for v in box))


def test_parsers_survive_deep_nesting():
    assert parse_score("[" * 2000 + '{"score": 3}', 0, 10) == 3.0
    assert parse_box("{" * 5000) is None


def _brute_force_expectation(p_first: torch.Tensor, p_next: torch.Tensor, lo: int) -> float:
    """Enumerate every valid answer lo..10 as token strings, weight by its probability, renormalise."""
    weights = {}
    for s in range(lo, 11):
        digits = [int(c) for c in str(s)]
        if len(digits) == 1:
            # one-digit answers other than "1" end right away by assumption; "1" must be followed by a non-digit
            weights[s] = p_first[s] * ((1 - p_next.sum()) if s == 1 else 1.0)
        else:
            weights[s] = p_first[1] * p_next[0]
    # renormalise per first digit as the documented estimator does: P(first=d | valid first digit), and "1" split
    # between 1 and 10 by the conditional odds of "0" vs a non-digit
    total_first = sum(p_first[d] for d in range(lo, 10))
    value = 0.0
    for d in range(lo, 10):
        q = p_first[d] / total_first
        if d == 1 and p_first[1] > 0:  # (a "1" of probability 0 adds nothing)
            w1, w10 = weights[1] / p_first[1], weights[10] / p_first[1]
            value += q * (1 * w1 + 10 * w10) / (w1 + w10)
        else:
            value += q * d
    return float(value)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([0, 1]))
def test_expected_score_matches_enumeration(seed, lo):
    g = torch.Generator().manual_seed(seed)
    vocab = 30  # digits are tokens 0..9 of this vocabulary, the rest are other tokens
    logits = torch.randn(2, 2, vocab, generator=g, dtype=torch.float64) * 3
    logp = logits.log_softmax(-1)[..., :10]
    got = expected_score(logp[:, 0], logp[:, 1], lo)
    for row in range(2):
        want = _brute_force_expectation(logp[row, 0].exp(), logp[row, 1].exp(), lo)
        assert got[row].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert lo <= got[row].item() <= 10


def test_expected_score_point_masses():
    def onehot(*tokens_with_mass):
        p = torch.full((12,), 1e-30, dtype=torch.float64)  # tokens 10, 11 are non-digits
        for t, m in tokens_with_mass:
            p[t] = m
        return (p / p.sum()).log()[None, :10]

    end = onehot((10, 1.0))  # after "1": a non-digit, i.e. the answer was "1"
    zero = onehot((0, 1.0))  # after "1": "0", i.e. the answer was "10"
    for d in (0, 2, 5, 9):
        assert expected_score(onehot((d, 1.0)), end, 0).item() == pytest.approx(d)
    assert expected_score(onehot((1, 1.0)), end, 0).item() == pytest.approx(1)
    assert expected_score(onehot((1, 1.0)), zero, 0).item() == pytest.approx(10)
    assert expected_score(onehot((1, 0.5), (8, 0.5)), onehot((0, 0.5), (10, 0.5)), 1).item() == pytest.approx(
        0.5 * 8 + 0.5 * 5.5)
    # "0" is not a valid first digit on a 1..10 scale: its mass is dropped
    assert expected_score(onehot((0, 0.9), (6, 0.1)), end, 1).item() == pytest.approx(6)


def test_expected_score_marks_non_finite_rows():
    good = torch.log_softmax(torch.randn(1, 20), -1)[:, :10]
    bad = good.clone()
    bad[0, 3] = torch.nan
    out = expected_score(torch.cat([good, bad, good]), torch.cat([good, good, torch.full_like(good, torch.inf)]), 0)
    assert torch.isfinite(out[0]) and torch.isnan(out[1:]).all()
    with pytest.raises(ValueError, match="start at 0 or 1"):
        expected_score(good, good, 2)


@pytest.mark.parametrize("lo, hi", [(0, 10), (1, 10)])
def test_scale_score_is_linear_onto_unit_interval(lo, hi):
    for s in range(lo, hi + 1):
        assert scale_score(s, lo, hi).item() == pytest.approx((s - lo) / (hi - lo))
    assert scale_score(lo, lo, hi).item() == 0 and scale_score(hi, lo, hi).item() == 1


# ------------------------------------------------------------------------------------------- mutation review
def test_parse_box_prefers_the_keyed_box_to_an_earlier_bare_list():
    """The whole JSON object is read before the lists inside it: `bbox_2d` wins over another 4-list (a point)."""
    assert parse_box('{"label": "cat", "points": [5, 5, 6, 6], "bbox_2d": [1, 2, 3, 4]}') == (1, 2, 3, 4)


def test_parsers_read_the_json_after_an_unparsable_brace():
    """A brace in prose that is no JSON is skipped, not the end of the search: the regex fallbacks would read the
    reasoning's `score: 2` and miss quoted box numbers."""
    assert parse_score('Note {x}. {"reasoning": "score: 2 would be unfair", "score": 9}', 0, 10) == 9.0
    assert parse_box('Here {is} it: {"box": ["1", "2", "3", "4"]}') == (1, 2, 3, 4)


@pytest.mark.parametrize("text", ['{"score": "7 points"}', '{"score": "7.5.1"}'])
def test_parse_score_returns_none_for_numeric_looking_strings(text):
    """Strings that only start like a number are no number: None, never a `float()` ValueError."""
    assert parse_score(text, 0, 10) is None


@pytest.mark.parametrize("text", [
    '{"bbox_2d": ["1px", 2, 3, 4]}', '{"bbox_2d": [1, 2, 3, 4, 5]}', '{"bbox_2d": [NaN, 0, 5, 5]}',
    '[0, 0, Infinity, 5]', '{"box": [-Infinity, 0, 5, 5]}',
])
def test_parse_box_returns_none_for_malformed_or_non_finite_boxes(text):
    """Five numbers, unit-suffixed strings and JSON's NaN/Infinity are no box (a NaN box would make R_RI NaN,
    which `RewardBreakdown` refuses mid-training)."""
    assert parse_box(text) is None


def test_json_keys_match_case_insensitively_and_the_first_score_wins():
    assert parse_box('{"BBOX_2D": ["1", "2", "3", "4"]}') == (1, 2, 3, 4)  # quoted: only the JSON path reads it
    assert parse_score('{"Score": "7", "details": {"score": 2}}', 0, 10) == 7.0
    assert parse_score('{"score": 7, "details": {"score": 3}}', 0, 10) == 7.0


def test_expected_score_stays_on_the_scale_when_digits_take_all_the_mass():
    """The judge's log-probs are fp32, so their probabilities may sum to a little over 1. After "1" all mass on
    digits then leaves `1 - sum(p)` below 0: P(10 | 1) must still be 1, not 1 + 2e-7 (a score above 10 scales
    above 1, which `RewardBreakdown` refuses)."""
    after = torch.full((1, 10), -1000.0, dtype=torch.float64)
    after[0, 0], after[0, 5] = math.log(0.6), math.log(0.4 + 1e-7)
    first = torch.full((1, 10), -1000.0, dtype=torch.float64)
    first[0, 1] = 0.0
    for lo in (0, 1):
        assert expected_score(first, after, lo).item() == 10.0


def test_expected_score_reads_one_when_only_invalid_digits_follow_it():
    """After "1" all mass on "5" (11..19 are no answers): P("0") and P(non-digit) both underflow to 0, and the
    answer is 1, not 0/0 = NaN (which would count the judge's answer as unparsable)."""
    first = torch.full((1, 10), -1000.0, dtype=torch.float64)
    first[0, 1] = first[0, 8] = math.log(0.5)
    after = torch.full((1, 10), -1000.0, dtype=torch.float64)
    after[0, 5] = 0.0
    assert expected_score(first, after, 1).item() == pytest.approx(0.5 * 1 + 0.5 * 8)


def test_scale_score_clamps_to_the_unit_interval():
    assert scale_score(11, 0, 10).item() == 1.0 and scale_score(0, 1, 10).item() == 0.0
    assert scale_score(torch.tensor([10.000001, -0.5]), 0, 10).tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------- -inf log-probs are probability 0
def _masked(*entries: tuple[int, float]) -> torch.Tensor:
    """A `[1, 10]` digit log-prob row: -inf (probability 0) except the given (digit, log-prob) entries."""
    row = torch.full((1, 10), -math.inf, dtype=torch.float64)
    for d, lp in entries:
        row[0, d] = lp
    return row


@pytest.mark.parametrize("lo", [0, 1])
def test_expected_score_reads_minus_inf_as_probability_zero(lo):
    """Hand-computed: every digit but the named ones is -inf (a judge that masks tokens, a 16-bit underflow)."""
    nothing = _masked()  # after "1": no digit at all, i.e. the answer ended ("1")
    assert expected_score(_masked((7, 0.0)), nothing, lo).item() == 7.0
    assert expected_score(_masked((1, 0.0)), _masked((0, 0.0)), lo).item() == 10.0  # "1" then "0"
    assert expected_score(_masked((1, 0.0)), nothing, lo).item() == 1.0  # "1" then end: p_end = 1
    # half "1", half "9"; after "1": "0" with 1/4, a non-digit with 3/4 (p_end = 1 - 1/4), "5" nowhere
    got = expected_score(_masked((1, math.log(0.5)), (9, math.log(0.5))), _masked((0, math.log(0.25))), lo)
    assert got.item() == pytest.approx(0.5 * 9 + 0.5 * (0.75 * 1 + 0.25 * 10), rel=1e-12)
    # after "1": "0" 1/2 and "3" 1/2 (13 is no answer, p_end = 0): "1" is 10
    assert expected_score(_masked((1, 0.0)), _masked((0, math.log(0.5)), (3, math.log(0.5))), lo).item() == 10.0


def test_expected_score_is_unparsable_without_valid_first_digit_mass_or_with_nan():
    end = _masked()
    assert torch.isnan(expected_score(_masked(), end, 0)).item()  # every first digit -inf
    assert torch.isnan(expected_score(_masked((0, 0.0)), end, 1)).item()  # only "0", not on a 1..10 scale
    assert expected_score(_masked((0, 0.0)), end, 0).item() == 0.0  # ...but valid on 0..10
    for broken in (math.nan, math.inf):
        assert torch.isnan(expected_score(_masked((7, 0.0), (3, broken)), end, 0)).item()
        assert torch.isnan(expected_score(_masked((7, 0.0)), _masked((4, broken)), 0)).item()
        assert torch.isnan(expected_score(_masked((7, 0.0), (0, broken)), end, 1)).item()  # even outside lo..9


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([0, 1]), st.lists(st.booleans(), min_size=20, max_size=20))
def test_expected_score_with_masked_digits_matches_enumeration(seed, lo, mask):
    """Random digits of both rows masked to -inf (at least one valid first digit kept): the expectation the
    enumeration gives with those probabilities 0, never NaN; a float32 input gives the same as float64."""
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(2, 30, generator=g, dtype=torch.float64) * 3).log_softmax(-1)[:, :10]
    masked = torch.tensor(mask).view(2, 10)
    masked[0, 9] = False  # a valid first digit keeps some mass
    logp = logp.masked_fill(masked, -math.inf)
    got = expected_score(logp[:1], logp[1:], lo)
    want = _brute_force_expectation(logp[0].exp(), logp[1].exp(), lo)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12) and lo <= got.item() <= 10
    assert expected_score(logp[:1].float(), logp[1:].float(), lo).item() == pytest.approx(want, rel=1e-5)
