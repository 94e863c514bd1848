import pytest
import torch
from PIL import Image

from gotr1.chain import ChainObject, ParsedChain, format_chain
from gotr1.rewards import COMPONENTS, Judge, RewardBreakdown, RewardSample, combine, reward_fn


def _breakdown(**overrides) -> RewardBreakdown:
    values = {"R_PI": [0.5, 1.0, 0.0], "R_sem": [0.2, 0.4, 1.0], "R_spa": [0.3, 0.1, 1.0], "R_RI": [0.8, 0.25, 1.0]}
    values.update(overrides)
    return RewardBreakdown(**{k: torch.tensor(v) for k, v in values.items()}, unparsable={"R_RI": 2})


def test_as_matrix_column_order_is_components():
    b = _breakdown()
    assert COMPONENTS == ("R_PI", "R_sem", "R_spa", "R_RI")
    m = b.as_matrix()
    assert m.shape == (3, 4) and m.dtype == torch.float32
    for j, name in enumerate(COMPONENTS):
        assert torch.equal(m[:, j], getattr(b, name))
    assert b.unparsable == {"R_PI": 0, "R_sem": 0, "R_spa": 0, "R_RI": 2}


def test_product_and_sum_formulas_are_exact():
    m = torch.tensor([[0.5, 0.25, 0.5, 0.75], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert combine(m).tolist() == [0.5 * (0.25 + 0.5) * 0.75, 0.0, 0.0]
    assert combine(m, "sum").tolist() == [2.0, 2.0, 3.0]
    assert combine(torch.ones(1, 4)).item() == 2.0  # the product's maximum
    w = [2.0, 1.0, 3.0, 0.5]
    assert combine(m, "product", w)[0].item() == pytest.approx(2 * 0.5 * (0.25 + 3 * 0.5) * 0.5 * 0.75)
    assert combine(m, "sum", w)[0].item() == pytest.approx(2 * 0.5 + 0.25 + 3 * 0.5 + 0.5 * 0.75)
    for j, name in enumerate(("R_PI", "R_sem", "R_spa", "R_RI")):  # a component alone (reward_combination)
        assert combine(m, name, w)[0].item() == pytest.approx(m[0, j].item() * w[j])


def test_combine_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        combine(torch.ones(3, 3))
    with pytest.raises(ValueError, match="unknown combination"):
        combine(torch.ones(3, 4), "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights must hold 4"):
        combine(torch.ones(3, 4), weights=[1, 2])


def test_reward_fn_logs_every_component():
    b = _breakdown()
    totals, metrics = reward_fn(b)
    assert torch.allclose(totals, combine(b.as_matrix()))
    assert metrics["reward/R_PI"] == pytest.approx(0.5) and metrics["reward/R_RI"] == pytest.approx(2.05 / 3)
    assert metrics["reward/unparsable/R_RI"] == 2 and metrics["reward/total"] == pytest.approx(float(totals.mean()))
    assert set(metrics) == {f"reward/{c}" for c in COMPONENTS} | {f"reward/unparsable/{c}" for c in COMPONENTS} | {
        "reward/total"}


@pytest.mark.parametrize("bad, match", [
    ({"R_PI": [0.5, 1.5, 0.0]}, "finite and in"),
    ({"R_sem": [0.5, float("nan"), 0.0]}, "finite and in"),
    ({"R_spa": [0.5, 0.5]}, "batch size"),
    ({"R_RI": [[0.5, 0.5, 0.5]]}, "1-D"),
])
def test_breakdown_validates(bad, match):
    with pytest.raises(ValueError, match=match):
        _breakdown(**bad)
    with pytest.raises(ValueError, match="unknown components"):
        RewardBreakdown(*(torch.zeros(2) for _ in COMPONENTS), unparsable={"R_XX": 1})


def test_reward_sample_reasoning_text_strips_tags():
    objs = [ChainObject("cat", (1, 2, 3, 4)), ChainObject("dog", (5, 6, 7, 8))]
    text = format_chain(objs, ["A", "and", "end."])
    s = RewardSample.from_text("a cat and a dog", text, Image.new("RGB", (8, 8)))
    assert s.chain.objects == objs and s.reasoning_text() == "A cat (1,2),(3,4) and dog (5,6),(7,8) end."
    bare = RewardSample("p", ParsedChain(objects=objs), Image.new("RGB", (8, 8)))
    assert bare.reasoning_text() == "cat (1,2),(3,4) dog (5,6),(7,8)"


class ExactJudge:
    """The programmatic-judge shape: the protocol is one method."""

    def score(self, samples):
        n = len(samples)
        return RewardBreakdown(torch.ones(n), torch.ones(n), torch.zeros(n),
                               torch.tensor([float(len(s.chain.objects) > 0) for s in samples]))


def test_programmatic_judges_implement_the_protocol():
    judge = ExactJudge()
    assert isinstance(judge, Judge)
    samples = [RewardSample.from_text("p", format_chain([ChainObject("a", (0, 0, 9, 9))]), Image.new("RGB", (4, 4))),
               RewardSample.from_text("p", "no boxes", Image.new("RGB", (4, 4)))]
    totals, _ = reward_fn(judge.score(samples))
    assert totals.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("combination", ["product", "sum"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_combine_raises_on_non_finite_components_and_weights(combination, bad):
    """A NaN reward must stop the step, not become a NaN total (the product would hide it behind R_PI=0: 0*NaN)."""
    for column in range(4):
        m = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 1.0, 1.0]])
        m[1, column] = bad
        with pytest.raises(ValueError, match="finite"):
            combine(m, combination)
        w = [1.0] * 4
        w[column] = bad
        with pytest.raises(ValueError, match="finite"):
            combine(torch.ones(2, 4), combination, w)


def test_combine_edge_values_are_exact():
    m = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert combine(m).tolist() == [0.0, 2.0, 0.0, 0.0]
    assert combine(m, "sum").tolist() == [0.0, 4.0, 2.0, 2.0]
    assert combine(torch.zeros(0, 4)).shape == (0,)
    # integer components with fractional weights are weighted, not truncated to the integer dtype
    assert combine(torch.ones(1, 4, dtype=torch.int64), "sum", [0.5, 0.25, 0.25, 0.5]).tolist() == [1.5]
    with pytest.raises(ValueError, match="finite in torch.float32"):
        combine(torch.ones(1, 4), weights=[1e39, 1.0, 1.0, 1.0])  # finite in Python, inf in float32


def test_weights_must_be_exactly_four():
    for weights in ([1.0] * 3, [1.0] * 5):
        with pytest.raises(ValueError, match="weights must hold 4"):
            combine(torch.ones(2, 4), weights=weights)


def test_empty_batch_logs_zero_not_nan():
    empty = RewardBreakdown(*(torch.zeros(0) for _ in COMPONENTS))
    totals, metrics = reward_fn(empty)
    assert totals.shape == (0,)
    assert metrics["reward/total"] == 0.0 and all(v == 0.0 for v in metrics.values())


def test_breakdown_refuses_negative_components():
    with pytest.raises(ValueError, match="finite and in"):
        _breakdown(R_RI=[0.5, -0.01, 0.0])


def test_codebook_subset_judge_scores_the_share_below_k():
    """R_PI = share of image tokens < K (K itself is outside), every other component 1; the product is 2 * share."""
    from gotr1.rewards import CodebookSubsetJudge

    def sample(tokens):
        return RewardSample("p", ParsedChain(), Image.new("RGB", (4, 4)), image_tokens=torch.tensor(tokens))

    judge = CodebookSubsetJudge(4)
    out = judge.score([sample([0, 3, 4, 5]), sample([4, 4, 4, 4]), sample([1, 2, 3, 0])])
    assert out.R_PI.tolist() == [0.5, 0.0, 1.0]
    assert out.R_sem.tolist() == out.R_spa.tolist() == out.R_RI.tolist() == [1.0] * 3
    assert combine(out.as_matrix()).tolist() == [1.0, 0.0, 2.0]
    assert len(judge.score([])) == 0
    with pytest.raises(ValueError, match="subset_size must be >= 1"):
        CodebookSubsetJudge(0)
    with pytest.raises(ValueError, match="needs the samples' image_tokens"):
        judge.score([sample([1]), RewardSample("p", ParsedChain(), Image.new("RGB", (4, 4)))])


# ------------------------------------------------------------------------------------------- mutation review
def test_reasoning_text_collapses_whitespace_left_by_the_tags():
    s = RewardSample("p", ParsedChain(), Image.new("RGB", (8, 8)),
                     reasoning="A  red\n\n<|obj_start|>cat<|obj_end|>\t <|box_start|>(1,2),(3,4)<|box_end|>  end ")
    assert s.reasoning_text() == "A red cat (1,2),(3,4) end"


def test_reward_samples_carry_each_samples_chain_text_and_image_tokens():
    """What the engine's groups hand the judge: every sample (in order), its own prose (R_sem reads it), codes and
    image, or None where the rollout did not decode it."""
    from types import SimpleNamespace

    from gotr1.chain import parse_chain
    from gotr1.rewards import reward_samples

    def out(text, k):
        return SimpleNamespace(chain=parse_chain(text), image=Image.new("RGB", (4, 4)) if k < 2 else None,
                               reasoning_text=text,
                               image_tokens=torch.full((4,), k))

    texts = [format_chain([ChainObject("cat", (1, 2, 3, 4))], ["A fat", "sits."]), "just prose", "more prose"]
    groups = [SimpleNamespace(prompt="p0", samples=[out(texts[0], 0), out(texts[1], 1)]),
              SimpleNamespace(prompt="p1", samples=[out(texts[2], 2)])]
    samples = reward_samples(groups)
    assert [(s.prompt, s.reasoning) for s in samples] == [("p0", texts[0]), ("p0", texts[1]), ("p1", texts[2])]
    assert [s.image_tokens.tolist() for s in samples] == [[k] * 4 for k in range(3)]
    assert samples[0].reasoning_text() == "A fat cat (1,2),(3,4) sits."
    assert [s.image for s in samples] == [o.image for g in groups for o in g.samples] and samples[2].image is None
