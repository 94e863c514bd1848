"""Group-relative advantages for GRPO in one launch: combine reward components, normalise within groups, broadcast.

Semantics follow TRL's `GRPOTrainer` (`_generate_and_score_completions`):
- a group is `group_size` consecutive samples (TRL's `view(-1, num_generations)`);
- the baseline is the group mean; `std` is the **unbiased** (Bessel-corrected) standard deviation, as `torch.std`;
- `scale_rewards="group"`: A = (r - mean_g) / (std_g + eps); `"batch"`: the std is that of the whole batch, the
  mean stays the group's (TRL's PPO-Lite variant); `"none"`: A = r - mean_g (Dr. GRPO);
- `eps` defaults to TRL's 1e-4.
Deviations from TRL, on purpose:
- a zero-variance group (all its valid rewards exactly equal, or fewer than two valid ones) gets advantage exactly 0.
  TRL divides rounding noise by `eps` instead. `zero_std_groups` is exact equality where TRL uses
  `isclose(std, 0)`;
- a non-finite reward raises, naming the sample, unless `nan_policy="mask"`. With masking, the sample is left out of
  its group's (and the batch's) statistics and gets advantage 0, like TRL's NaN rewards (reward functions that
  return None).

Reward columns are `REWARD_COLUMNS` = (R_PI, R_sem, R_spa, R_RI). `combine="product"` is GoT-R1's
R_PI * (R_sem + R_spa) * R_RI, `"sum"` adds all K columns (ablation), and an int selects one column.

One program per group computes its statistics. In batch mode each program also recomputes the batch statistics,
which costs G*N loads and saves a second launch. It writes the per-sample advantages and, given `token_counts`,
their broadcast over a packed token layout (sample i owns `token_counts[i]` consecutive tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

REWARD_COLUMNS: tuple[str, ...] = ("R_PI", "R_sem", "R_spa", "R_RI")

_COMBINE = {"product": 0, "sum": 1}
_SCALE = {"group": 0, "batch": 1, "none": 2}


@dataclass(frozen=True)
class AdvantageOutput:
    """All tensors fp32 unless noted; G groups of N samples."""

    advantages: torch.Tensor  # [G*N]
    token_advantages: torch.Tensor | None  # [sum(token_counts)], the advantages repeated per token
    combined_rewards: torch.Tensor  # [G*N], NaN where a masked sample had a non-finite component
    group_mean: torch.Tensor  # [G], over valid samples
    group_std: torch.Tensor  # [G], unbiased, over valid samples; 0 where fewer than two
    zero_std_groups: torch.Tensor  # [G] bool: all valid rewards equal (their advantages are 0)
    valid: torch.Tensor  # [G*N] bool: samples used in the statistics

    @property
    def num_zero_std_groups(self) -> int:
        return int(self.zero_std_groups.sum())


def _prepare(rewards: torch.Tensor, group_size: int, combine: str | int, scale_rewards: str, nan_policy: str,
             token_counts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Validate; returns (rewards as fp32, token counts as int64 or None, total tokens). Raises on non-finite
    rewards in the columns `combine` uses unless masking."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G*N, K], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    total, k = rewards.shape
    if group_size < 1 or total % group_size:
        raise ValueError(f"{total} samples do not split into groups of group_size={group_size}")
    if scale_rewards not in _SCALE:
        raise ValueError(f"scale_rewards must be one of {sorted(_SCALE)}, got {scale_rewards!r}")
    if nan_policy not in ("raise", "mask"):
        raise ValueError(f"nan_policy must be 'raise' or 'mask', got {nan_policy!r}")
    if combine == "product":
        if k != len(REWARD_COLUMNS):
            raise ValueError(f"combine='product' needs the {len(REWARD_COLUMNS)} columns {REWARD_COLUMNS}, got K={k}")
        used = list(range(k))
    elif combine == "sum":
        used = list(range(k))
    elif isinstance(combine, int) and not isinstance(combine, bool) and 0 <= combine < k:
        used = [combine]
    else:
        raise ValueError(f"combine must be 'product', 'sum' or a column index in [0, {k}), got {combine!r}")
    rewards = rewards.float().contiguous()  # the kernel reads columns at stride 1
    if nan_policy == "raise":
        bad = ~torch.isfinite(rewards[:, used])
        if bad.any():
            i, j = bad.nonzero()[0].tolist()
            col = used[j]
            name = REWARD_COLUMNS[col] if combine == "product" else f"column {col}"
            raise ValueError(f"reward {name} of sample {i} (group {i // group_size}, member {i % group_size}) is "
                             f"{rewards[i, col].item()}; pass nan_policy='mask' to leave it out of the statistics")
    if token_counts is None:
        return rewards, None, 0
    token_counts = torch.as_tensor(token_counts, device=rewards.device).long()
    if token_counts.shape != (total,):
        raise ValueError(f"token_counts must be [G*N={total}], got shape {tuple(token_counts.shape)}")
    if bool((token_counts < 0).any()):
        raise ValueError("token_counts must be non-negative")
    return rewards, token_counts.contiguous(), int(token_counts.sum())


# ----------------------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------------------

def combine_rewards(rewards: torch.Tensor, combine: Literal["product", "sum"] | int = "product") -> torch.Tensor:
    """`[B, K]` components -> `[B]` totals: GoT-R1's `R_PI * (R_sem + R_spa) * R_RI` (columns in `REWARD_COLUMNS`
    order), the sum of all columns (the paper's ablation), or one column."""
    if combine == "product":
        return rewards[:, 0] * (rewards[:, 1] + rewards[:, 2]) * rewards[:, 3]
    if combine == "sum":
        return rewards.sum(1)
    return rewards[:, combine]


def group_advantages_reference(
    rewards: torch.Tensor, group_size: int, *, combine: Literal["product", "sum"] | int = "product",
    scale_rewards: Literal["group", "batch", "none"] = "group", eps: float = 1e-4,
    token_counts: torch.Tensor | None = None, nan_policy: Literal["raise", "mask"] = "raise",
) -> AdvantageOutput:
    """TRL's recipe in eager torch (`view(-1, N)`, nan-aware mean and unbiased std), plus the exact-zero rule."""
    rewards, token_counts, _ = _prepare(rewards, group_size, combine, scale_rewards, nan_policy, token_counts)
    r = combine_rewards(rewards, combine)
    valid = torch.isfinite(r)
    rv = r.masked_fill(~valid, float("nan"))  # non-finite -> NaN, so the nan-aware reductions skip it
    grouped, vg = rv.view(-1, group_size), valid.view(-1, group_size)
    count = vg.sum(1)
    mean = torch.where(count > 0, grouped.nanmean(1), 0.0)
    var = ((grouped - mean[:, None]) ** 2).nansum(1) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), 0.0)
    hi = grouped.masked_fill(~vg, float("-inf")).amax(1)
    lo = grouped.masked_fill(~vg, float("inf")).amin(1)
    zero = (count < 2) | (hi == lo)
    centred = r - mean.repeat_interleave(group_size)
    if scale_rewards == "group":
        adv = centred / (std.repeat_interleave(group_size) + eps)
    elif scale_rewards == "batch":
        n_valid = int(valid.sum())
        batch_std = ((rv - rv.nanmean()) ** 2).nansum().div(max(n_valid - 1, 1)).sqrt() if n_valid > 1 else 0.0
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    adv = torch.where(valid & ~zero.repeat_interleave(group_size), adv, 0.0)
    tok = adv.repeat_interleave(token_counts) if token_counts is not None else None
    return AdvantageOutput(adv, tok, r, mean, std, zero, valid)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _combined_reward(rewards_ptr, rows, row_mask, stride_r, K: tl.constexpr, COMBINE: tl.constexpr,
                     COLUMN: tl.constexpr, BLOCK_K: tl.constexpr):
    base = rewards_ptr + rows.to(tl.int64) * stride_r
    if COMBINE == 0:
        pi = tl.load(base + 0, mask=row_mask, other=0.0)
        sem = tl.load(base + 1, mask=row_mask, other=0.0)
        spa = tl.load(base + 2, mask=row_mask, other=0.0)
        ri = tl.load(base + 3, mask=row_mask, other=0.0)
        r = pi * (sem + spa) * ri
    elif COMBINE == 1:
        cols = tl.arange(0, BLOCK_K)
        tile = tl.load(base[:, None] + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
        r = tl.sum(tile, 1)
    else:
        r = tl.load(base + COLUMN, mask=row_mask, other=0.0)
    return r


@triton.jit
def _is_valid(r, row_mask):
    return row_mask & (r == r) & (tl.abs(r) < float("inf"))


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, counts_ptr, adv_ptr, tok_ptr, combined_ptr, mean_ptr, std_ptr, zero_ptr, valid_ptr,
    stride_r, total, eps,
    N: tl.constexpr, K: tl.constexpr, COMBINE: tl.constexpr, COLUMN: tl.constexpr, SCALE: tl.constexpr,
    HAS_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    in_group = offs < N
    rows = group * N + offs
    r = _combined_reward(rewards_ptr, rows, in_group, stride_r, K, COMBINE, COLUMN, BLOCK_K)
    valid = _is_valid(r, in_group)
    count = tl.sum(valid.to(tl.float32), 0)
    mean = tl.sum(tl.where(valid, r, 0.0), 0) / tl.maximum(count, 1.0)
    dev = tl.where(valid, r - mean, 0.0)
    std = tl.where(count > 1.0, tl.sqrt(tl.sum(dev * dev, 0) / tl.maximum(count - 1.0, 1.0)), 0.0)
    hi = tl.max(tl.where(valid, r, float("-inf")), 0)
    lo = tl.min(tl.where(valid, r, float("inf")), 0)
    zero = (count < 2.0) | (hi == lo)

    if SCALE == 0:
        adv = dev / (std + eps)
    elif SCALE == 1:
        # Batch std (two passes over all samples; each group's program repeats them rather than launch twice).
        b_sum = 0.0
        b_count = 0.0
        for start in range(0, total, BLOCK_B):
            b_rows = start + tl.arange(0, BLOCK_B)
            b_in = b_rows < total
            b_r = _combined_reward(rewards_ptr, b_rows, b_in, stride_r, K, COMBINE, COLUMN, BLOCK_K)
            b_valid = _is_valid(b_r, b_in)
            b_sum += tl.sum(tl.where(b_valid, b_r, 0.0), 0)
            b_count += tl.sum(b_valid.to(tl.float32), 0)
        b_mean = b_sum / tl.maximum(b_count, 1.0)
        b_sq = 0.0
        for start in range(0, total, BLOCK_B):
            b_rows = start + tl.arange(0, BLOCK_B)
            b_in = b_rows < total
            b_r = _combined_reward(rewards_ptr, b_rows, b_in, stride_r, K, COMBINE, COLUMN, BLOCK_K)
            b_dev = tl.where(_is_valid(b_r, b_in), b_r - b_mean, 0.0)
            b_sq += tl.sum(b_dev * b_dev, 0)
        b_std = tl.where(b_count > 1.0, tl.sqrt(b_sq / tl.maximum(b_count - 1.0, 1.0)), 0.0)
        adv = dev / (b_std + eps)
    else:
        adv = dev
    adv = tl.where(zero, 0.0, tl.where(valid, adv, 0.0))

    tl.store(adv_ptr + rows, adv, mask=in_group)
    tl.store(combined_ptr + rows, r, mask=in_group)
    tl.store(valid_ptr + rows, valid.to(tl.int8), mask=in_group)
    tl.store(mean_ptr + group, mean)
    tl.store(std_ptr + group, std)
    tl.store(zero_ptr + group, zero.to(tl.int8))

    if HAS_TOKENS:
        # This group's first token: the token counts of all earlier samples, summed.
        start_tok = tl.zeros([BLOCK_B], tl.int64)
        for start in range(0, group * N, BLOCK_B):
            prev = start + tl.arange(0, BLOCK_B)
            start_tok += tl.load(counts_ptr + prev, mask=prev < group * N, other=0)
        counts = tl.load(counts_ptr + rows, mask=in_group, other=0)
        first = tl.sum(start_tok, 0) + tl.cumsum(counts, 0) - counts
        t = tl.arange(0, BLOCK_T)
        for i in range(N):
            pick = offs == i
            a = tl.sum(tl.where(pick, adv, 0.0), 0)
            n_tok = tl.sum(tl.where(pick, counts, 0), 0)
            base = tl.sum(tl.where(pick, first, 0), 0)
            for chunk in range(0, n_tok, BLOCK_T):
                tl.store(tok_ptr + base + chunk + t, tl.zeros([BLOCK_T], tl.float32) + a,
                         mask=chunk + t < n_tok)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, combine: Literal["product", "sum"] | int = "product",
    scale_rewards: Literal["group", "batch", "none"] = "group", eps: float = 1e-4,
    token_counts: torch.Tensor | None = None, nan_policy: Literal["raise", "mask"] = "raise",
) -> AdvantageOutput:
    """Advantages of `rewards [G*N, K]` (columns `REWARD_COLUMNS`) in groups of `group_size`, in one launch.

    `token_counts [G*N]`, when given, also yields `token_advantages`, each sample's advantage repeated over its
    tokens in a packed layout. See the module docstring for the exact (TRL) semantics and the two deliberate
    differences. Validation syncs with the host once: rewards are checked for NaN here, not in the kernel.
    """
    rewards, counts, n_tokens = _prepare(rewards, group_size, combine, scale_rewards, nan_policy, token_counts)
    total, k = rewards.shape
    num_groups = total // group_size
    dev = rewards.device
    adv = torch.empty(total, dtype=torch.float32, device=dev)
    combined = torch.empty(total, dtype=torch.float32, device=dev)
    valid = torch.empty(total, dtype=torch.int8, device=dev)
    mean = torch.empty(num_groups, dtype=torch.float32, device=dev)
    std = torch.empty(num_groups, dtype=torch.float32, device=dev)
    zero = torch.empty(num_groups, dtype=torch.int8, device=dev)
    tok = torch.empty(n_tokens, dtype=torch.float32, device=dev) if counts is not None else None
    if num_groups:
        _group_advantages_kernel[(num_groups,)](
            rewards, counts if counts is not None else adv, adv, tok if tok is not None else adv, combined, mean,
            std, zero, valid,
            rewards.stride(0), total, eps,
            N=group_size, K=k, COMBINE=_COMBINE.get(combine, 2), COLUMN=combine if isinstance(combine, int) else 0,
            SCALE=_SCALE[scale_rewards], HAS_TOKENS=counts is not None, BLOCK_N=triton.next_power_of_2(group_size),
            BLOCK_K=triton.next_power_of_2(k), BLOCK_B=1024, BLOCK_T=1024,
        )
    return AdvantageOutput(adv, tok, combined, mean, std, zero.bool(), valid.bool())
