import json

import pytest

from gotr1.data import PromptStream, read_prompts


def test_read_prompts_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two cats  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "two cats"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": " a dog  ", "category": "x"}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a dog"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_prompts(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


def test_stream_is_seeded_covers_each_epoch_and_resumes():
    prompts = [f"p{i}" for i in range(7)]
    s = PromptStream(prompts, seed=3)
    first = s.take(7)
    assert sorted(first) == prompts
    second = s.take(7)
    assert sorted(second) == prompts and second != first
    a = PromptStream(prompts, seed=3)
    a.take(5)
    b = PromptStream(prompts, seed=3)
    b.load_state(a.state())
    assert a.take(10) == b.take(10)
    with pytest.raises(ValueError, match="empty"):
        PromptStream([])


# ------------------------------------------------------------------------------------- adversarial additions
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), per_step=st.integers(1, 12), steps=st.integers(1, 8), stop=st.integers(0, 8),
       seed=st.integers(0, 2**31))
def test_a_resumed_stream_sees_exactly_the_uninterrupted_prompts(n, per_step, steps, stop, seed):
    """Any step count and any stopping point (epoch boundaries, per_step not dividing n): a stream restored from
    `state()` continues with the same prompts, and every epoch is one permutation of the prompts."""
    prompts = [f"p{i}" for i in range(n)]
    full = PromptStream(prompts, seed=seed)
    expected = [full.take(per_step) for _ in range(steps)]
    stop = min(stop, steps)
    first = PromptStream(prompts, seed=seed)
    seen = [first.take(per_step) for _ in range(stop)]
    resumed = PromptStream(prompts, seed=seed)
    resumed.load_state(dict(first.state()))
    seen += [resumed.take(per_step) for _ in range(steps - stop)]
    assert seen == expected
    flat = [p for step in expected for p in step]
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == prompts


def test_a_data_state_that_does_not_fit_the_prompts_is_a_clear_error():
    """Resuming with a shorter prompt file (or a corrupted state) must say so, not fail later with IndexError."""
    s = PromptStream([f"p{i}" for i in range(10)], seed=1)
    s.take(8)
    short = PromptStream(["a", "b", "c"], seed=1)
    with pytest.raises(ValueError, match="position 8"):
        short.load_state(s.state())
    with pytest.raises(ValueError, match="epoch"):
        short.load_state({"epoch": -1, "position": 0})
    short.load_state({"epoch": 2, "position": 3})  # the end of an epoch is a valid position
    assert sorted(short.take(3)) == ["a", "b", "c"]


def _objective_case(loss_type: str):
    import torch
    from torch import nn

    from gotr1.config import GRPOConfig
    from gotr1.policy import make_batch

    g = torch.Generator().manual_seed(0)
    h, v, i = 8, 11, 5
    lm, vh = nn.Linear(h, v), nn.Linear(h, v)
    reasoning = [[7], [3, 4, 7], [5, 7], [7]]  # samples 0 and 3 hold just their <begin_of_image>
    forced = [True, False, True, False]
    image = torch.randint(0, v, (4, i), generator=g)
    batch = make_batch([[1, 2]] * 4, reasoning, image, pad_id=0,
                       train_mask=[[True] * (len(r) - 1) + [not f] for r, f in zip(reasoning, forced)])
    text_h = torch.randn(4, batch.reasoning_ids.shape[1], h, generator=g)
    image_h = torch.randn(4, i, h, generator=g)
    ref = (torch.randn(4, batch.reasoning_ids.shape[1], generator=g), torch.randn(4, i, generator=g))
    adv = torch.randn(4, generator=g)
    config = GRPOConfig(loss_type=loss_type, beta=0.1)
    return lm, vh, batch, text_h, image_h, ref, adv, config, 3 + 1 + i


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_objective_matches_one_head_reference_and_logs_the_step_loss(loss_type):
    """Summed over micro-batches (one of them image-only: a forced BOI is its only reasoning token) the objective
    is the torch one-head reduction of TRL's `loss_type`; the logged `loss`, averaged over micro-batches as the
    GRPO driver does, is the step's loss whatever `gradient_accumulation_steps` is (TRL logs the sum of the
    micro-batch losses / GA)."""
    import torch

    from gotr1.grpo import _select
    from gotr1.objective import grpo_objective

    lm, vh, batch, text_h, image_h, ref, adv, config, mcl = _objective_case(loss_type)
    with torch.no_grad():
        lp = torch.cat([torch.log_softmax(lm(text_h), -1).gather(-1, batch.reasoning_ids[..., None])[..., 0],
                        torch.log_softmax(vh(image_h), -1).gather(-1, batch.image_tokens[..., None])[..., 0]], 1)
    mask = torch.cat([batch.reasoning_mask, torch.ones_like(batch.image_tokens, dtype=torch.float32)], 1)
    r = torch.cat(ref, 1)
    per_token = -adv[:, None] + config.beta * (torch.exp(r - lp) - (r - lp) - 1)
    total = float(mask.sum())
    for k in (1, 2, 4):
        micro = list(torch.arange(4).tensor_split(k))
        step_loss, logged = 0.0, 0.0
        for idx in micro:
            loss, m, _ = grpo_objective(
                text_h[idx], image_h[idx], lm, vh, _select(batch, idx), old_logp=None,
                ref_logp=(ref[0][idx], ref[1][idx]), advantages=adv[idx], config=config, num_micro_batches=k,
                total_tokens=total, max_completion_length=mcl)
            assert torch.isfinite(loss)
            step_loss += loss.item()
            logged += m["loss"] / k
        if loss_type == "bnpo":  # the local micro-batch's tokens, then / GA
            expected = sum(float((per_token[i] * mask[i]).sum() / mask[i].sum()) for i in micro) / k
        elif loss_type == "grpo":
            expected = float(((per_token * mask).sum(1) / mask.sum(1)).mean())
        elif loss_type == "dr_grpo":
            expected = float((per_token * mask).sum() / (4 * mcl))
        else:
            expected = float((per_token * mask).sum() / total)
        assert step_loss == pytest.approx(expected, rel=1e-5)
        assert logged == pytest.approx(step_loss, rel=1e-5), f"logged loss with {k} micro-batches"
