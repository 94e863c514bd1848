"""Fused GRPO loss: from the last hidden states and the head weight to the loss and its gradients, chunked so the
`[tokens, V]` logits never exist at once (and never in fp32).

TRL semantics (`GRPOTrainer._compute_loss`, token-level importance sampling), with `m` the completion mask:
- `logp = log_softmax(h W^T / temperature)[target]`; `ratio = exp(logp - old_logp)` (`old_logp=None`: TRL's
  `logp.detach()`, ratio 1 with gradient A);
- `l = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl`, where
  `kl = exp(ref - logp) - (ref - logp) - 1` (k3); `epsilon_high=None` means `epsilon`;
- the reduction by `loss_type`:
  - `grpo`: mean over sequences of `sum_t l m / max(sum_t m, 1)`;
  - `bnpo`: `sum l m / max(sum m, 1)`;
  - `dr_grpo`: `sum l m / (B * max_completion_length)`, where `max_completion_length` defaults to T;
  - `dapo`: `sum l m / num_items_in_batch`. TRL passes `num_items_in_batch / num_processes`, the active tokens
    of the whole generation batch; the default here is `max(sum m, 1)`.
  Gradient-accumulation scaling is the caller's business.
- Metrics are masked means over active tokens: `kl` (None without `ref_logp`); `clip_ratio_low`, for
  `ratio < 1 - epsilon` with `A < 0`; `clip_ratio_high`, for `ratio > 1 + epsilon_high` with `A > 0`;
  `clip_ratio_region`, for either; and `ratio_mean`.

Each of these reductions is `sum_t w_t l_t` with per-token weights `w_t` known before any logit is computed, and
`l_t` depends only on `logp_t`. The fused path therefore computes the gradients inside the forward, as Liger's chunked
losses do, and never runs a second pass over the vocabulary. For each chunk of active (unmasked) tokens:
1. `logits = h_c W^T` (cuBLAS, input dtype: bf16 in training).
2. A Triton kernel does an online log-sum-exp per row in fp32 and gathers `logp`.
3. Torch autograd on the elementwise loss of those few tokens gives `g = dL/dlogp`; no hand-written derivative.
4. A second Triton kernel overwrites the logits buffer with `dL/dlogits = g (onehot - softmax) / temperature`.
5. `grad_h_c = dlogits W` and `grad_W += dlogits^T h_c`.
Peak extra memory is one chunk of logits in the input dtype (default about 2^27 elements) plus the gradients.
Masked tokens are skipped, not computed and zeroed, so padding costs nothing. `backward` scales the stored gradients.

Because the gradients are stored in the input dtype before `backward` runs, a loss scaler's scale applied to the
loss (`GradScaler.scale(loss).backward()`) would come too late in fp16: DAPO's per-token gradients (weights of about
1/150k tokens) times the softmax underflow in step 4. `grad_scale` therefore multiplies `g` before step 4, so the
stored 16-bit gradients carry the scale, and `backward` returns them times `grad_loss / grad_scale`: exactly the
stored values under `scaler.scale(loss).backward()` (`grad_loss == grad_scale`), and d(loss) for a plain backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
_CHUNK_ELEMENTS = 1 << 27  # logits elements per chunk: 256 MiB of bf16


@dataclass(frozen=True)
class GRPOLossMetrics:
    """Detached 0-d fp32 tensors, masked means over active tokens (TRL's logged names in comments)."""

    kl: torch.Tensor | None  # "kl"; None without ref_logp
    clip_ratio_low: torch.Tensor  # "clip_ratio/low_mean"
    clip_ratio_high: torch.Tensor  # "clip_ratio/high_mean"
    clip_ratio_region: torch.Tensor  # "clip_ratio/region_mean"
    ratio_mean: torch.Tensor
    logp: torch.Tensor  # [B, T] fp32 per-token log-probs (0 where masked): the next iteration's old_logp


# ----------------------------------------------------------------------------------------------------------------
# Shared definitions: the per-token objective and the metrics (elementwise on [B, T] or on a chunk of tokens)
# ----------------------------------------------------------------------------------------------------------------

def _per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                    adv: torch.Tensor, beta: float, eps_low: float, eps_high: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, ratio, k3 kl or None) per token; all inputs finite and of one shape."""
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        if beta != 0.0:
            loss = loss + beta * kl
    return loss, ratio, kl


def _metrics(ratio: torch.Tensor, kl: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor,
             eps_low: float, eps_high: float, logp: torch.Tensor) -> GRPOLossMetrics:
    m = mask.float()
    count = m.sum().clamp(min=1.0)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() * m).sum() / count).detach()

    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    return GRPOLossMetrics(kl=None if kl is None else mean(kl), clip_ratio_low=mean(low), clip_ratio_high=mean(high),
                           clip_ratio_region=mean(low | high), ratio_mean=mean(ratio),
                           logp=torch.where(mask.bool(), logp.detach().float(), 0.0))


def _check(hidden, weight, target_ids, old_logp, ref_logp, advantages, mask, beta, epsilon, epsilon_high,
           loss_type, temperature, bias=None, token_weights=None) -> float:
    """Validate shapes and options; returns epsilon_high resolved."""
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden must be [B, T, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    bt = hidden.shape[:2]
    for name, t in (("target_ids", target_ids), ("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask),
                    ("token_weights", token_weights)):
        if t is not None and t.shape != bt:
            raise ValueError(f"{name} must be [B, T] = {tuple(bt)}, got {tuple(t.shape)}")
    if advantages.shape != bt[:1]:
        raise ValueError(f"advantages must be [B] = ({bt[0]},), got {tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if not temperature > 0:  # written so that NaN fails too
        raise ValueError(f"temperature must be positive, got {temperature}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if not (epsilon >= 0 and epsilon_high >= 0):
        raise ValueError(f"epsilon and epsilon_high must be non-negative, got {epsilon}, {epsilon_high}")
    return epsilon_high


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: full fp32 logits, TRL's reductions, torch autograd
# ----------------------------------------------------------------------------------------------------------------

def grpo_loss_reference(
    hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *, beta: float, epsilon: float,
    epsilon_high: float | None = None, loss_type: LossType = "dapo", temperature: float = 1.0,
    max_completion_length: int | None = None, num_items_in_batch: float | None = None,
    bias: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GRPOLossMetrics]:
    """The unfused loss as TRL computes it, materialising `[B, T, V]` fp32 logits; differentiable by autograd."""
    eps_high = _check(hidden, weight, target_ids, old_logp, ref_logp, advantages, mask, beta, epsilon, epsilon_high,
                      loss_type, temperature, bias, token_weights)
    bsz, seq = hidden.shape[:2]
    m = mask.bool()
    logits = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    logits = logits.to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    targets = torch.where(m, target_ids, 0).long()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    # Masked positions are set to 0 before the loss, so junk there cannot turn into NaN (or NaN gradients).
    logp = torch.where(m, logp, 0.0)
    old = None if old_logp is None else torch.where(m, old_logp.float(), 0.0)
    ref = None if ref_logp is None else torch.where(m, ref_logp.float(), 0.0)
    adv = advantages.float()[:, None].expand(bsz, seq)
    per_token, ratio, kl = _per_token_loss(logp, old, ref, adv, beta, epsilon, eps_high)
    mf = m.float()
    if token_weights is not None:
        loss = (per_token * mf * token_weights.float()).sum()
    elif loss_type == "grpo":
        loss = ((per_token * mf).sum(-1) / mf.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mf).sum() / mf.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mf).sum() / (bsz * (max_completion_length or seq))
    else:
        norm = num_items_in_batch if num_items_in_batch is not None else mf.sum().clamp(min=1.0)
        loss = (per_token * mf).sum() / norm
    return loss, _metrics(ratio, kl, adv, m, epsilon, eps_high, logp)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: one program per token row of a logits chunk
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _logp_kernel(logits_ptr, target_ptr, lse_ptr, logp_ptr, stride_row, V, inv_temp, BLOCK_V: tl.constexpr):
    """Online log-sum-exp of one row of logits / temperature in fp32, and the target's log-probability."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m_vec, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), 0))
    target = tl.load(target_ptr + row).to(tl.int64)
    x_t = tl.load(base + target).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, x_t - lse)


@triton.jit
def _dlogits_kernel(logits_ptr, target_ptr, lse_ptr, grad_ptr, stride_row, V, inv_temp, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with dL/dlogits = g * (onehot(target) - softmax(logits / T)) / T."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row) * inv_temp
    target = tl.load(target_ptr + row).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        valid = idx < V
        x = tl.load(base + idx, mask=valid, other=0.0).to(tl.float32) * inv_temp
        d = g * (tl.where(idx == target, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(base + idx, d.to(logits_ptr.dtype.element_ty), mask=valid)


def _logp_rows_torch(logits, target, lse_out, logp_out, inv_temp: float) -> None:
    """`_logp_kernel` in torch ops, for CPUs (where Triton only interprets): same outputs, fp32."""
    x = logits.float() * inv_temp
    lse_out.copy_(torch.logsumexp(x, -1))
    logp_out.copy_(x.gather(1, target[:, None].long()).squeeze(1) - lse_out)


def _dlogits_rows_torch(logits, target, lse, grad, inv_temp: float) -> None:
    """`_dlogits_kernel` in torch ops: logits <- g * (onehot - softmax(logits / T)) / T, in place."""
    d = torch.exp(logits.float() * inv_temp - lse[:, None]).neg_()
    d.scatter_add_(1, target[:, None].long(), torch.ones_like(lse)[:, None])
    logits.copy_(d.mul_((grad.float() * inv_temp)[:, None]))


def _launch_config(vocab: int) -> dict:
    block_v = min(4096, triton.next_power_of_2(vocab))
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


# ----------------------------------------------------------------------------------------------------------------
# Fused path
# ----------------------------------------------------------------------------------------------------------------

def _token_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int | None,
                   num_items_in_batch: float | None) -> torch.Tensor:
    """w with loss = sum_t w_t l_t, the four reductions of `grpo_loss_reference` written as token weights."""
    m = mask.float()
    bsz, seq = m.shape
    if loss_type == "grpo":
        return m / (bsz * m.sum(-1, keepdim=True).clamp(min=1.0))
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / (bsz * (max_completion_length or seq))
    return m / (num_items_in_batch if num_items_in_batch is not None else m.sum().clamp(min=1.0))


class _FusedGRPOLoss(torch.autograd.Function):
    """loss = sum_t w_t l(logp_t); gradients are computed in forward, chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, old_logp, ref_logp, advantages, token_weights, active, beta,
                eps_low, eps_high, temperature, chunk_rows, need_hidden_grad, need_weight_grad, need_bias_grad,
                use_triton, grad_scale):
        bsz, seq, hdim = hidden.shape
        vocab = weight.shape[0]
        h = hidden.reshape(bsz * seq, hdim)
        grad_h = torch.zeros_like(h) if need_hidden_grad else None
        grad_w = torch.zeros_like(weight) if need_weight_grad else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias_grad else None
        logp_all = torch.zeros(bsz * seq, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        adv_tok = advantages.float().repeat_interleave(seq)
        per_token = [t.reshape(-1) if t is not None else None for t in (target_ids, old_logp, ref_logp)]
        cfg = _launch_config(vocab)
        inv_temp = 1.0 / temperature
        for start in range(0, active.numel(), chunk_rows):
            idx = active[start:start + chunk_rows]
            rows = idx.numel()
            tgt, old, ref = (t.index_select(0, idx) if t is not None else None for t in per_token)
            old = None if old is None else old.float()
            ref = None if ref is None else ref.float()
            h_c = h.index_select(0, idx)
            # [rows, V] in the input dtype: the only vocabulary-sized buffer
            logits = h_c @ weight.T if bias is None else torch.addmm(bias, h_c, weight.T)
            lse = torch.empty(rows, dtype=torch.float32, device=h.device)
            logp = torch.empty(rows, dtype=torch.float32, device=h.device)
            if use_triton:
                _logp_kernel[(rows,)](logits, tgt, lse, logp, logits.stride(0), vocab, inv_temp, **cfg)
            else:
                _logp_rows_torch(logits, tgt, lse, logp, inv_temp)
            with torch.enable_grad():
                lp = logp.detach().requires_grad_()
                l_tok, _, _ = _per_token_loss(lp, old, ref, adv_tok.index_select(0, idx), beta, eps_low, eps_high)
                chunk_loss = (l_tok * token_weights.index_select(0, idx)).sum()
                need_grad = need_hidden_grad or need_weight_grad or need_bias_grad
                (g,) = torch.autograd.grad(chunk_loss, lp) if need_grad else (None,)
            loss += chunk_loss.detach()
            logp_all.index_copy_(0, idx, logp)
            if g is None:
                continue
            g = g * grad_scale  # before the 16-bit dlogits buffer is written: see the module docstring
            if use_triton:
                _dlogits_kernel[(rows,)](logits, tgt, lse, g.contiguous(), logits.stride(0), vocab, inv_temp, **cfg)
            else:
                _dlogits_rows_torch(logits, tgt, lse, g, inv_temp)
            if grad_h is not None:
                grad_h.index_copy_(0, idx, logits @ weight)
            if grad_w is not None:
                grad_w.addmm_(logits.T, h_c)
            if grad_b is not None:
                grad_b += logits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.hidden_shape = hidden.shape
        ctx.grad_scale = grad_scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(logp_all)
        return loss, logp_all.view(bsz, seq)

    @staticmethod
    def backward(ctx, grad_loss, grad_logp):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # A 0-d fp32 scale keeps the gradients' dtype; torch multiplies in fp32 and rounds once. The stored gradients
        # carry grad_scale: with grad_loss == grad_scale (a loss scaler's backward) the factor is exactly 1.
        scale = grad_loss.float() / ctx.grad_scale
        dh = None if grad_h is None else (grad_h * scale).view(ctx.hidden_shape)
        dw = None if grad_w is None else grad_w * scale
        db = None if grad_b is None else (grad_b * scale).to(ctx.bias_dtype)
        return (dh, dw, db) + (None,) * 16


def fused_grpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *, beta: float, epsilon: float,
    epsilon_high: float | None = None, loss_type: LossType = "dapo", temperature: float = 1.0,
    max_completion_length: int | None = None, num_items_in_batch: float | None = None,
    bias: torch.Tensor | None = None, token_weights: torch.Tensor | None = None, chunk_size: int | None = None,
    backend: Literal["auto", "triton", "torch"] = "auto", grad_scale: float = 1.0,
) -> tuple[torch.Tensor, GRPOLossMetrics]:
    """GRPO loss from hidden `[B, T, H]` and head weight `[V, H]` without materialising the logits.

    `target_ids`, `old_logp`, `ref_logp`, `mask` are `[B, T]` (TRL's padded layout), `advantages` `[B]`. Returns
    `(loss, metrics)`; the loss is differentiable w.r.t. `hidden` and, if they require grad, `weight` and `bias`.
    `bias` `[V]` is added to the logits (Janus's generation head has one). `token_weights` `[B, T]`, when given,
    replace the `loss_type` reduction: loss = sum over unmasked tokens of w * l, so that a caller can reduce one
    sequence spread over two heads (text and image) as a whole. `metrics.logp` holds the per-token log-probs.
    `backend`: the two per-row passes over the vocabulary run as Triton kernels (`auto` on CUDA) or as the same
    chunked algorithm in torch ops (`auto` on CPU, where Triton would only interpret).
    `chunk_size` is the number of active tokens per chunk (default: about 2^27 logits).
    `grad_scale`: a loss scaler's current scale (fp16 training), multiplied into the gradients before they are stored
    in the input dtype; backpropagate `grad_scale * loss` (`GradScaler.scale(loss)`) to get them unchanged. The
    returned loss is never scaled.
    One host sync finds the active tokens and checks their target ids.
    """
    eps_high = _check(hidden, weight, target_ids, old_logp, ref_logp, advantages, mask, beta, epsilon, epsilon_high,
                      loss_type, temperature, bias, token_weights)
    if chunk_size is not None and chunk_size < 1:  # range() would skip every chunk: a loss of 0, silently
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if not (math.isfinite(grad_scale) and grad_scale > 0):  # 0 or inf would store 0/inf/NaN gradients
        raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale}")
    bsz, seq = hidden.shape[:2]
    vocab = weight.shape[0]
    m = mask.bool()
    active = m.reshape(-1).nonzero().squeeze(1)
    if active.numel():
        tgt = target_ids.reshape(-1).index_select(0, active)
        lo, hi = int(tgt.min()), int(tgt.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"target ids of unmasked tokens must lie in [0, {vocab}), found {lo if lo < 0 else hi}")
    chunk_rows = chunk_size or max(1, _CHUNK_ELEMENTS // vocab)
    weights = (_token_weights(m, loss_type, max_completion_length, num_items_in_batch) if token_weights is None
               else token_weights.float() * m).reshape(-1)
    grad_on = torch.is_grad_enabled()
    loss, logp = _FusedGRPOLoss.apply(
        hidden, weight, bias, target_ids, old_logp, ref_logp, advantages, weights, active, beta, epsilon, eps_high,
        temperature, chunk_rows, grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        hidden.is_cuda if backend == "auto" else backend == "triton", float(grad_scale),
    )
    with torch.no_grad():
        old = None if old_logp is None else torch.where(m, old_logp.float(), 0.0)
        if old is None:
            old = logp
        ref = None if ref_logp is None else torch.where(m, ref_logp.float(), 0.0)
        adv = advantages.float()[:, None].expand(bsz, seq)
        _, ratio, kl = _per_token_loss(logp, old, ref, adv, beta, epsilon, eps_high)
    return loss, _metrics(ratio, kl, adv, m, epsilon, eps_high, logp)
