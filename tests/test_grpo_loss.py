"""Fused GRPO loss against the eager reference (loss, metrics, both gradients by torch autograd), and the reference
against TRL's `_compute_loss` written out on full logits."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_paged_attention import DEVICE, max_rel_err, norm_rel_err

from kernels.grpo_loss import LOSS_TYPES, fused_grpo_loss, grpo_loss_reference

KW = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=0.7)


def loss_case(b=3, t=7, h=24, v=37, seed=0, log_ratio_scale=0.3, dtype=torch.float32, temperature=KW["temperature"]):
    """Random inputs; the last sequence is fully masked, the first keeps a single token. old log-probs are the
    current ones shifted by N(0, log_ratio_scale), so ratios straddle the clip range. ref log-probs stay at least 0.2
    away: the k3 gradient 1 - exp(ref - logp) cancels as they meet and would then amplify the last-ulp differences
    of any two fp32 log-softmax implementations past 1e-5. For the same reason the logits have std 0.5: a
    probability within ~1e-3 of 1 makes the gradient of its log-softmax, 1 - p, ill-conditioned in fp32 (torch's as
    much as ours)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = 0.5 * torch.randn(v, h, generator=g) / h**0.5
    target = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.75
    if b > 1:
        mask[-1] = False
        mask[0] = False
        mask[0, t // 2] = True
    logp = torch.log_softmax(hidden @ weight.T / temperature, -1).gather(-1, target[..., None])[..., 0]
    old = logp + log_ratio_scale * torch.randn(b, t, generator=g)
    shift = torch.randn(b, t, generator=g)
    ref = logp + shift.sign() * (0.2 + log_ratio_scale * shift.abs())
    adv = torch.randn(b, generator=g)
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), *(x.to(DEVICE) for x in (target, old, ref, adv, mask)))


def run(fn, hidden, weight, *args, weight_grad=True, grad_scale=1.7, **kw):
    """Loss, metrics, and the gradients of grad_scale * loss w.r.t. fresh leaf copies of hidden and weight."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight_grad)
    loss, metrics = fn(h, w, *args, **kw)
    (grad_scale * loss).backward()
    return loss.detach(), metrics, h.grad, w.grad


def loss_err(loss, expected, adv) -> float:
    """Error of a loss relative to max(|expected|, max |A|). The loss is a weighted mean of per-token terms of size
    about |A| * ratio that may cancel to nearly 0, so a bare relative error is ill-conditioned there."""
    return abs(float(loss) - float(expected)) / max(abs(float(expected)), float(adv.abs().max()), 1e-30)


def assert_metrics_close(a, b, tol):
    for name in ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert abs(float(x) - float(y)) <= tol * max(1.0, abs(float(y))), (name, float(x), float(y))


def trl_oracle(hidden, weight, target, old, ref, adv, mask, loss_type, beta, epsilon, epsilon_high, temperature,
               max_completion_length=None, num_items_in_batch=None):
    """TRL GRPOTrainer._compute_loss on full logits (logp via cross-entropy), masks multiplied in as TRL does."""
    logits = (hidden.double() @ weight.double().T) / temperature
    logp = -F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    m = mask.double()
    old = logp.detach() if old is None else old  # TRL's on-policy case: ratio 1, gradient A
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.size(0) * (max_completion_length or target.shape[1]))
    else:
        loss = (per_token * m).sum() / (num_items_in_batch or m.sum())
    low = ((coef_1 < 1 - epsilon) & (adv[:, None] < 0)).double()
    high = ((coef_1 > 1 + epsilon_high) & (adv[:, None] > 0)).double()
    metrics = {"kl": (kl * m).sum() / m.sum(), "clip_ratio_low": (low * m).sum() / m.sum(),
               "clip_ratio_high": (high * m).sum() / m.sum(), "ratio_mean": (coef_1 * m).sum() / m.sum()}
    return loss, metrics


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_matches_trl(loss_type):
    hidden, weight, target, old, ref, adv, mask = loss_case(6, 9, log_ratio_scale=0.5)
    extra = {"dr_grpo": dict(max_completion_length=11), "dapo": dict(num_items_in_batch=13.0)}.get(loss_type, {})
    loss, metrics = grpo_loss_reference(hidden, weight, target, old, ref, adv, mask, loss_type=loss_type, **KW,
                                        **extra)
    expected, expected_metrics = trl_oracle(hidden, weight, target, old.double(), ref.double(), adv.double(),
                                            mask, loss_type, **KW, **extra)
    assert abs(float(loss) - float(expected)) < 1e-5 * abs(float(expected))
    for name, value in expected_metrics.items():
        assert abs(float(getattr(metrics, name)) - float(value)) < 1e-5, name
    assert 0 < float(metrics.clip_ratio_low) and 0 < float(metrics.clip_ratio_high)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(3, 7, 24, 37), (1, 1, 8, 5), (4, 5, 16, 130)])
@pytest.mark.usefixtures("poison")
def test_fused_matches_reference_fp32(shape, loss_type, backend):
    b, t, h, v = shape
    hidden, weight, target, old, ref, adv, mask = loss_case(b, t, h, v, seed=b * t)
    args = (target, old, ref, adv, mask)
    extra = {"dr_grpo": dict(max_completion_length=t + 3), "dapo": dict(num_items_in_batch=11.0)}.get(loss_type, {})
    f_loss, f_metrics, f_dh, f_dw = run(fused_grpo_loss, hidden, weight, *args, loss_type=loss_type, chunk_size=4,
                                        backend=backend, **KW, **extra)
    r_loss, r_metrics, r_dh, r_dw = run(grpo_loss_reference, hidden, weight, *args, loss_type=loss_type, **KW,
                                        **extra)
    assert loss_err(f_loss, r_loss, adv) < 1e-5
    assert max_rel_err(f_dh, r_dh) < 1e-5
    assert max_rel_err(f_dw, r_dw) < 1e-5
    assert_metrics_close(f_metrics, r_metrics, 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.usefixtures("poison", "gpu_rounding")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_bf16(loss_type, seed, backend):
    """bf16 in, bf16 gradients out: the loss within 1e-2 of the eager bf16 reference (a near-cancelling scalar, so
    judged against the same input rounding), the gradients within 1e-2 (norm-wise) of the fp32 reference."""
    hidden, weight, target, old, ref, adv, mask = loss_case(4, 9, 32, 300, dtype=torch.bfloat16, seed=seed)
    args = (target, old, ref, adv, mask)
    f_loss, f_metrics, f_dh, f_dw = run(fused_grpo_loss, hidden, weight, *args, loss_type=loss_type, chunk_size=8,
                                        backend=backend, **KW)
    assert f_dh.dtype == f_dw.dtype == torch.bfloat16
    e_loss, e_metrics, _, _ = run(grpo_loss_reference, hidden, weight, *args, loss_type=loss_type, **KW)
    _, _, r_dh, r_dw = run(grpo_loss_reference, hidden.float(), weight.float(), *args, loss_type=loss_type, **KW)
    assert loss_err(f_loss, e_loss, adv) < 1e-2
    assert_metrics_close(f_metrics, e_metrics, 1e-2)
    assert norm_rel_err(f_dh, r_dh) < 1e-2
    assert norm_rel_err(f_dw, r_dw) < 1e-2


@pytest.mark.usefixtures("poison")
def test_ratios_far_outside_the_clip_range():
    """With |log ratio| ~ 3, most tokens are clipped: clipped tokens get no policy gradient, only the KL's."""
    hidden, weight, target, old, ref, adv, mask = loss_case(4, 6, 16, 40, log_ratio_scale=3.0)
    args = (target, old, ref, adv, mask)
    f = run(fused_grpo_loss, hidden, weight, *args, loss_type="bnpo", **KW)
    r = run(grpo_loss_reference, hidden, weight, *args, loss_type="bnpo", **KW)
    assert float(r[1].clip_ratio_region) > 0.3
    assert loss_err(f[0], r[0], adv) < 1e-5
    assert max_rel_err(f[2], r[2]) < 1e-5 and max_rel_err(f[3], r[3]) < 1e-5
    assert_metrics_close(f[1], r[1], 1e-5)


def test_all_equal_rewards_leave_only_the_kl_term():
    hidden, weight, target, old, ref, _, mask = loss_case()
    zero_adv = torch.zeros(3, device=DEVICE)
    loss, metrics = fused_grpo_loss(hidden, weight, target, old, ref, zero_adv, mask, loss_type="bnpo", **KW)
    assert abs(float(loss) - KW["beta"] * float(metrics.kl)) < 1e-6
    no_kl, _ = fused_grpo_loss(hidden, weight, target, old, None, zero_adv, mask, loss_type="bnpo",
                               **{**KW, "beta": 0.0})
    assert float(no_kl) == 0.0


@pytest.mark.usefixtures("poison")
def test_fully_masked_batch_gives_zero_not_nan():
    hidden, weight, target, old, ref, adv, _ = loss_case()
    mask = torch.zeros(3, 7, dtype=torch.bool, device=DEVICE)
    for fn in (fused_grpo_loss, grpo_loss_reference):
        for loss_type in LOSS_TYPES:
            loss, metrics, dh, dw = run(fn, hidden, weight, target, old, ref, adv, mask, loss_type=loss_type, **KW)
            assert float(loss) == 0.0 and float(metrics.clip_ratio_region) == 0.0
            assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.usefixtures("poison")
def test_junk_at_masked_positions_is_ignored():
    """TRL pads with anything: -100 targets, inf/NaN log-probs. None of it may reach the loss or the gradients."""
    hidden, weight, target, old, ref, adv, mask = loss_case()
    clean = [run(fn, hidden, weight, target, old, ref, adv, mask, loss_type="grpo", **KW)
             for fn in (fused_grpo_loss, grpo_loss_reference)]
    target, old, ref = target.clone(), old.clone(), ref.clone()
    target[~mask], old[~mask], ref[~mask] = -100, float("nan"), float("-inf")
    for fn, (c_loss, _, c_dh, c_dw) in zip((fused_grpo_loss, grpo_loss_reference), clean):
        loss, _, dh, dw = run(fn, hidden, weight, target, old, ref, adv, mask, loss_type="grpo", **KW)
        assert torch.equal(loss, c_loss) and torch.equal(dh, c_dh) and torch.equal(dw, c_dw)


@pytest.mark.usefixtures("poison")
def test_old_logp_none_and_no_weight_grad():
    """old_logp=None is TRL's single-iteration case (ratio 1); a frozen head gets no gradient."""
    hidden, weight, target, _, ref, adv, mask = loss_case()
    f = run(fused_grpo_loss, hidden, weight, target, None, ref, adv, mask, loss_type="dapo", weight_grad=False, **KW)
    r = run(grpo_loss_reference, hidden, weight, target, None, ref, adv, mask, loss_type="dapo", weight_grad=False,
            **KW)
    assert f[3] is None and r[3] is None
    assert float(f[1].ratio_mean) == 1.0 and float(f[1].clip_ratio_region) == 0.0
    assert loss_err(f[0], r[0], adv) < 1e-5 and max_rel_err(f[2], r[2]) < 1e-5


def test_no_grad_and_chunk_size_invariance():
    hidden, weight, target, old, ref, adv, mask = loss_case(3, 7, 24, 37)
    with torch.no_grad():
        ref_loss, _ = grpo_loss_reference(hidden, weight, target, old, ref, adv, mask, **KW)
        losses = [fused_grpo_loss(hidden, weight, target, old, ref, adv, mask, chunk_size=c, **KW)[0]
                  for c in (1, 3, None)]
    for loss in losses:
        assert loss_err(loss, ref_loss, adv) < 1e-5


def test_bad_inputs_raise():
    hidden, weight, target, old, ref, adv, mask = loss_case()
    bad_target = target.clone()
    bad_target[mask] = 37
    with pytest.raises(ValueError, match=r"target ids of unmasked tokens must lie in \[0, 37\)"):
        fused_grpo_loss(hidden, weight, bad_target, old, ref, adv, mask, **KW)
    with pytest.raises(ValueError, match="beta != 0 needs ref_logp"):
        fused_grpo_loss(hidden, weight, target, old, None, adv, mask, **KW)
    with pytest.raises(ValueError, match="loss_type"):
        fused_grpo_loss(hidden, weight, target, old, ref, adv, mask, loss_type="sapo", **{**KW, "beta": 0.0})
    with pytest.raises(ValueError, match="advantages must be"):
        fused_grpo_loss(hidden, weight, target, old, ref, adv[:2], mask, **KW)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_grpo_loss(hidden, weight.double(), target, old, ref, adv, mask, **KW)
    for fn in (fused_grpo_loss, grpo_loss_reference):
        for temperature in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="temperature must be positive"):
                fn(hidden, weight, target, old, ref, adv, mask, **{**KW, "temperature": temperature})
        for eps in (dict(epsilon=-0.1), dict(epsilon_high=-0.1), dict(epsilon=float("nan"))):
            with pytest.raises(ValueError, match="must be non-negative"):
                fn(hidden, weight, target, old, ref, adv, mask, **{**KW, **eps})
    for chunk_size in (0, -1):  # a negative step would skip every chunk: loss 0 and no gradient, silently
        with pytest.raises(ValueError, match="chunk_size must be a positive"):
            fused_grpo_loss(hidden, weight, target, old, ref, adv, mask, chunk_size=chunk_size, **KW)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), h=st.integers(1, 20), v=st.integers(2, 50),
       chunk=st.integers(1, 8), loss_type=st.sampled_from(LOSS_TYPES), temperature=st.floats(0.5, 1.5),
       seed=st.integers(0, 2**16))
def test_random_shapes(b, t, h, v, chunk, loss_type, temperature, seed):
    hidden, weight, target, old, ref, adv, mask = loss_case(b, t, h, v, seed=seed, temperature=temperature)
    kw = {**KW, "temperature": temperature, "loss_type": loss_type}
    f = run(fused_grpo_loss, hidden, weight, target, old, ref, adv, mask, chunk_size=chunk, backend="triton", **kw)
    r = run(grpo_loss_reference, hidden, weight, target, old, ref, adv, mask, **kw)
    assert loss_err(f[0], r[0], adv) < 1e-5
    assert max_rel_err(f[2], r[2]) < 1e-5 and max_rel_err(f[3], r[3]) < 1e-5


def test_bench_reference_forward_backward(benchmark):
    hidden, weight, target, old, ref, adv, mask = loss_case(4, 64, 64, 1024)
    benchmark(run, grpo_loss_reference, hidden, weight, target, old, ref, adv, mask, **KW)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.usefixtures("poison")
def test_bias_and_its_gradient_match_reference(backend):
    hidden, weight, target, old, ref, adv, mask = loss_case(seed=5)
    bias = torch.randn(weight.shape[0], device=DEVICE)
    grads = []
    for fn in (partial(fused_grpo_loss, backend=backend), grpo_loss_reference):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        b = bias.detach().clone().requires_grad_()
        loss, metrics = fn(h, w, target, old, ref, adv, mask, bias=b, loss_type="grpo", **KW)
        (1.3 * loss).backward()
        grads.append((loss.detach(), h.grad, w.grad, b.grad, metrics.logp))
    (lf, hf, wf, bf, pf), (lr, hr, wr, br, pr) = grads
    assert loss_err(lf, lr, adv) < 1e-5
    for x, y in ((hf, hr), (wf, wr), (bf, br)):
        assert max_rel_err(x, y) < 1e-5
    torch.testing.assert_close(pf, pr, rtol=1e-5, atol=1e-6)
    assert bool((pf[~mask] == 0).all())


def test_token_weights_reduce_two_heads_as_one_sequence():
    """Splitting each sequence's tokens over two calls with per-sequence weights 1/(B * n_b) gives exactly the
    'grpo' loss of one call over all tokens: what the GoT objective does for text + image heads."""
    hidden, weight, target, old, ref, adv, mask = loss_case(b=4, t=10, seed=7)
    full, _ = grpo_loss_reference(hidden, weight, target, old, ref, adv, mask, loss_type="grpo", **KW)
    n = mask.sum(-1, keepdim=True).clamp(min=1).float()
    w = mask.float() / (mask.shape[0] * n)
    cut = 4
    parts = [fused_grpo_loss(hidden[:, s].contiguous(), weight, target[:, s], old[:, s], ref[:, s], adv,
                             mask[:, s], token_weights=w[:, s], **KW)[0]
             for s in (slice(0, cut), slice(cut, None))]
    assert loss_err(parts[0] + parts[1], full, adv) < 1e-5


@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_match_trl(loss_type, on_policy):
    """Both implementations against TRL's loss differentiated by fp64 autograd, including the on-policy case
    (old_logp=None), where the ratio is 1 in value but its gradient, A * dlogp, is the whole policy gradient."""
    hidden, weight, target, old, ref, adv, mask = loss_case(4, 6, 16, 29, seed=3, log_ratio_scale=0.5)
    old = None if on_policy else old
    extra = {"dr_grpo": dict(max_completion_length=9), "dapo": dict(num_items_in_batch=10.0)}.get(loss_type, {})
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected, _ = trl_oracle(h, w, target, None if old is None else old.double(), ref.double(), adv.double(), mask,
                             loss_type, **KW, **extra)
    expected.backward()
    for fn in (grpo_loss_reference, partial(fused_grpo_loss, backend="torch")):
        loss, _, dh, dw = run(fn, hidden, weight, target, old, ref, adv, mask, loss_type=loss_type, grad_scale=1.0,
                              **KW, **extra)
        assert loss_err(loss, expected.detach(), adv) < 1e-5
        assert max_rel_err(dh, h.grad) < 1e-5 and max_rel_err(dw, w.grad) < 1e-5


@pytest.mark.parametrize("fn", [partial(fused_grpo_loss, backend="triton"), partial(fused_grpo_loss, backend="torch"),
                                grpo_loss_reference], ids=["fused-triton", "fused-torch", "reference"])
@pytest.mark.usefixtures("poison")
def test_asymmetric_clipping_by_hand(fn):
    """Hand-computed values. A zero head gives logp = -log V for every token, so old log-probs set each ratio
    exactly; the three sequences have A = +1, -1 and 0. With epsilon 0.2 / epsilon_high 0.28 (range [0.8, 1.28]):
    A=+1: l = -min(r, clip r) = -[0.5, 0.75, 0.9, 1.25, 1.28], dl/dlogp = -r unless clipped (r = 1.5);
    A=-1: l = max(r, clip r) = [0.8, 0.8, 0.9, 1.25, 1.5], dl/dlogp = r unless clipped (r = 0.5, 0.75);
    A=0: l = 0 and no clip counted (TRL counts low clips only for A < 0 and high ones only for A > 0).
    `beta=0` with a reference 100 nats above: the k3 KL overflows to inf and must stay out of the loss."""
    b, t, v = 3, 5, 4
    r = torch.tensor([0.5, 0.75, 0.9, 1.25, 1.5])
    hidden = torch.randn(b, t, 2, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    weight = torch.zeros(v, 2, device=DEVICE)
    target = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 3, 0, 1], [2, 2, 2, 2, 2]], device=DEVICE)
    logp = -torch.log(torch.tensor(float(v)))
    old = (logp - r.log()).expand(b, t).contiguous().to(DEVICE)
    ref = torch.full((b, t), float(logp) + 100.0, device=DEVICE)
    adv = torch.tensor([1.0, -1.0, 0.0], device=DEVICE)
    mask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    g = torch.tensor([[-0.5, -0.75, -0.9, -1.25, 0.0], [0.0, 0.0, 0.9, 1.25, 1.5], [0.0] * 5]) / 15
    onehot = F.one_hot(target.cpu(), v).float()
    expected_dw = torch.einsum("bt,btv,bth->vh", g, onehot - 1 / v, hidden.cpu())
    cases = [  # epsilon_high, loss, clip_ratio_low, clip_ratio_high
        (0.28, (-(0.5 + 0.75 + 0.9 + 1.25 + 1.28) + (0.8 + 0.8 + 0.9 + 1.25 + 1.5)) / 15, 2 / 15, 1 / 15),
        (0.0, (-(0.5 + 0.75 + 0.9 + 1.0 + 1.0) + (0.8 + 0.8 + 0.9 + 1.25 + 1.5)) / 15, 2 / 15, 2 / 15),  # 0 is 0
    ]
    for eps_high, want_loss, want_low, want_high in cases:
        loss, metrics, dh, dw = run(fn, hidden, weight, target, old, ref, adv, mask, beta=0.0, epsilon=0.2,
                                    epsilon_high=eps_high, loss_type="bnpo", grad_scale=1.0)
        assert float(loss) == pytest.approx(want_loss, abs=1e-6)
        assert float(metrics.clip_ratio_low) == pytest.approx(want_low, abs=1e-7)
        assert float(metrics.clip_ratio_high) == pytest.approx(want_high, abs=1e-7)
        assert float(metrics.clip_ratio_region) == pytest.approx(want_low + want_high, abs=1e-7)
        assert float(metrics.ratio_mean) == pytest.approx(float(r.mean()), abs=1e-6)
        assert torch.equal(dh.cpu(), torch.zeros(b, t, 2))
        if eps_high == 0.28:
            assert max_rel_err(dw, expected_dw) < 1e-5


# ------------------------------------------------------------------------------------------------ GoT objective
def test_objective_dapo_weights_are_world_over_the_step_tokens():
    """TRL's dapo divides by num_items_in_batch / num_processes: DDP then averages the ranks' gradients."""
    from gotr1.config import GRPOConfig
    from gotr1.objective import token_weights

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for world in (1, 2, 4):
        w_text, w_image = token_weights(mask, 5, GRPOConfig(loss_type="dapo"), num_micro_batches=3, total_tokens=40.0,
                                        max_completion_length=8, world=world)
        torch.testing.assert_close(w_text, mask * world / 40)
        torch.testing.assert_close(w_image, torch.full((2, 5), world / 40))


def test_objective_uses_each_heads_temperature_and_token_weights_its_metrics():
    """One call over text + image heads against TRL's formulas on the concatenated sequence: each head's logits are
    divided by its own temperature, and every metric is a mean over all active tokens of both heads."""
    from torch import nn

    from gotr1.config import GRPOConfig
    from gotr1.objective import grpo_objective
    from gotr1.policy import make_batch

    gen = torch.Generator().manual_seed(1)
    h, v, n_img = 8, 13, 6
    lm, vh = nn.Linear(h, v), nn.Linear(h, v)
    reasoning = [[3, 4, 7], [5, 7], [7], [1, 2, 3, 7]]
    batch = make_batch([[1, 2]] * 4, reasoning, torch.randint(0, v, (4, n_img), generator=gen), pad_id=0)
    text_h = torch.randn(4, batch.reasoning_ids.shape[1], h, generator=gen)
    image_h = torch.randn(4, n_img, h, generator=gen)
    config = GRPOConfig(loss_type="bnpo", beta=0.1, epsilon=0.2, epsilon_high=0.28, text_temperature=0.5,
                        image_temperature=2.0)
    with torch.no_grad():
        lp = torch.cat([torch.log_softmax(lm(text_h) / 0.5, -1).gather(-1, batch.reasoning_ids[..., None])[..., 0],
                        torch.log_softmax(vh(image_h) / 2.0, -1).gather(-1, batch.image_tokens[..., None])[..., 0]],
                       1)
    r_len = batch.reasoning_ids.shape[1]
    old = lp + 0.6 * torch.randn(lp.shape, generator=gen)
    ref = lp + 0.3 * torch.randn(lp.shape, generator=gen)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    loss, metrics, _ = grpo_objective(
        text_h, image_h, lm, vh, batch, old_logp=(old[:, :r_len], old[:, r_len:]),
        ref_logp=(ref[:, :r_len], ref[:, r_len:]), advantages=adv, config=config, num_micro_batches=1,
        total_tokens=0.0, max_completion_length=0)
    m = torch.cat([batch.reasoning_mask, torch.ones(4, n_img)], 1)
    ratio = torch.exp(lp - old)
    a = adv[:, None]
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_token = -torch.min(ratio * a, ratio.clamp(0.8, 1.28) * a) + 0.1 * kl
    low, high = (ratio < 0.8) & (a < 0), (ratio > 1.28) & (a > 0)

    def mean(x):
        return float((x.float() * m).sum() / m.sum())

    assert 0 < mean(low) and 0 < mean(high) and mean(low) != mean(high)
    assert loss.item() == pytest.approx(float((per_token * m).sum() / m.sum()), rel=1e-5)
    for name, x in (("kl", kl), ("ratio_mean", ratio), ("clip_ratio/low_mean", low),
                    ("clip_ratio/high_mean", high), ("clip_ratio/region_mean", low | high)):
        assert metrics[name] == pytest.approx(mean(x), rel=1e-5, abs=1e-7), name


# ------------------------------------------------------------------------------------------------ fp16 loss scaling
def scaled_grads(hidden, weight, bias, args, kw, grad_scale, grad_loss):
    """Fused loss with `grad_scale`, backpropagated with `grad_loss`; returns the gradients of hidden, weight and bias
    and the gradients the forward stored (what `save_for_backward` packed, caught by a saved-tensors hook).
    `grad_scale=None` leaves the argument at its default."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    stored = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t) or t, lambda t: t):
        scale = {} if grad_scale is None else {"grad_scale": grad_scale}
        loss, _ = fused_grpo_loss(h, w, *args, bias=b, **scale, **kw)
    loss.backward(torch.tensor(grad_loss, device=loss.device))
    return (h.grad, w.grad, None if b is None else b.grad), stored


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.usefixtures("poison")
def test_grad_scale_keeps_fp16_gradients_that_underflow_without_it(backend):
    """DAPO over 150k tokens: each token's gradient is about |A| / 150k, times softmax probabilities ~1/300 in the
    stored fp16 dlogits, below fp16's smallest subnormal (6e-8). Unscaled, gradient entries that are not 0 in fp64
    come out 0 and the error is several %; with the loss scaler's 2^16 applied before the fp16 store (backward by
    `scale * loss`, as `GradScaler.scale(loss).backward()` does), the gradients divided by the scale in fp64 are
    within fp16 rounding of the fp64 reference."""
    hidden, weight, target, old, ref, adv, mask = loss_case(4, 9, 32, 300, seed=0)
    args, kw = (target, old, ref, adv, mask), dict(KW, loss_type="dapo", num_items_in_batch=150_000.0)
    _, _, r_dh, r_dw = run(grpo_loss_reference, hidden.double(), weight.double(), *args, grad_scale=1.0, **kw)
    errors = {}
    for scale in (1.0, 2.0**16):
        (dh, dw, _), _ = scaled_grads(hidden.half(), weight.half(), None, args,
                                      dict(kw, chunk_size=16, backend=backend), scale, scale)
        assert dh.dtype == dw.dtype == torch.float16
        dh, dw = dh.double() / scale, dw.double() / scale
        lost = int(((dh == 0) & (r_dh != 0)).sum()) + int(((dw == 0) & (r_dw != 0)).sum())
        errors[scale] = (lost, norm_rel_err(dh, r_dh), norm_rel_err(dw, r_dw))
    lost, err_h, err_w = errors[1.0]
    assert lost > 100 and err_h > 0.02 and err_w > 0.02, errors  # the underflow the scale is for
    lost, err_h, err_w = errors[2.0**16]
    assert lost == 0 and err_h < 1e-3 and err_w < 1e-3, errors


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grad_scale_is_stored_and_passed_through_by_a_scaled_backward(backend):
    """grad_scale=S then backward with grad_loss=S returns exactly the stored gradients (fp16: no rounding on the
    way out), which carry the scale; in fp32 with S a power of two, those are exactly S x the unscaled gradients, a
    plain backward gives exactly the unscaled ones, and grad_scale=1 is the default bit for bit. The loss is never
    scaled."""
    hidden, weight, target, old, ref, adv, mask = loss_case(3, 7, 24, 37, seed=4)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(4)).to(DEVICE)
    args, kw = (target, old, ref, adv, mask), dict(KW, loss_type="grpo", chunk_size=4, backend=backend)
    s = 2.0**10
    grads, stored = scaled_grads(hidden.half(), weight.half(), bias.half(), args, kw, s, s)
    stored_h, stored_w, stored_b = stored[-3:]  # save_for_backward packs last, after the chunks' own autograd
    assert (stored_h.shape, stored_w.shape, stored_b.shape) == ((21, 24), (37, 24), (37,))
    assert torch.equal(grads[0], stored_h.view_as(grads[0])) and torch.equal(grads[1], stored_w)
    assert torch.equal(grads[2], stored_b.half())
    unscaled, _ = scaled_grads(hidden, weight, bias, args, kw, 1.0, 1.0)
    for x, y in zip(grads, unscaled):
        assert norm_rel_err(x.double() / s, y) < 1e-2
    default, _ = scaled_grads(hidden, weight, bias, args, kw, None, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(unscaled, default))
    scaled, _ = scaled_grads(hidden, weight, bias, args, kw, s, s)
    plain, _ = scaled_grads(hidden, weight, bias, args, kw, s, 1.0)
    for a, b, c in zip(scaled, plain, unscaled):
        assert torch.equal(a, c * s) and torch.equal(b, c)
    with torch.no_grad():
        assert torch.equal(fused_grpo_loss(hidden, weight, *args, grad_scale=s, **kw)[0],
                           fused_grpo_loss(hidden, weight, *args, **kw)[0])


def test_bad_grad_scale_raises():
    hidden, weight, target, old, ref, adv, mask = loss_case()
    for scale in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
            fused_grpo_loss(hidden, weight, target, old, ref, adv, mask, grad_scale=scale, **KW)


def test_objective_passes_grad_scale_to_both_heads():
    """`grpo_objective(grad_scale=S)` backpropagated by S * loss: exactly S x the unscaled gradients of both heads'
    inputs and weights (fp32, S a power of two), the loss unchanged."""
    from torch import nn

    from gotr1.config import GRPOConfig
    from gotr1.objective import grpo_objective
    from gotr1.policy import make_batch

    gen = torch.Generator().manual_seed(2)
    lm, vh = nn.Linear(8, 13), nn.Linear(8, 11)
    batch = make_batch([[1, 2]] * 2, [[3, 4, 7], [5]], torch.randint(0, 11, (2, 4), generator=gen), pad_id=0)
    text_h = torch.randn(2, batch.reasoning_ids.shape[1], 8, generator=gen)
    image_h = torch.randn(2, 4, 8, generator=gen)
    results = []
    for scale in (1.0, 2.0**10):
        th, ih = text_h.clone().requires_grad_(), image_h.clone().requires_grad_()
        lm.zero_grad(), vh.zero_grad()
        loss, _, _ = grpo_objective(th, ih, lm, vh, batch, old_logp=None, ref_logp=None,
                                    advantages=torch.tensor([1.0, -0.5]), config=GRPOConfig(loss_type="dapo"),
                                    num_micro_batches=1, total_tokens=10.0, max_completion_length=8,
                                    grad_scale=scale)
        (loss * scale).backward()
        results.append((loss.detach(), [t.grad.clone() for t in (th, ih, lm.weight, lm.bias, vh.weight, vh.bias)]))
    (loss1, grads1), (loss_s, grads_s) = results
    assert torch.equal(loss1, loss_s)
    for a, b in zip(grads1, grads_s):
        assert a.abs().max() > 0 and torch.equal(a * 2.0**10, b)
