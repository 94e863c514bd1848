"""R_total from the four components (GoT-R1 README / arXiv v1): product by default, sum as the ablation.

* product: `R_PI * (R_sem + R_spa) * R_RI`, in [0, 2]. Any failed check (image off-prompt, image off-plan) zeroes
  the reward, which is why the paper prefers it. Paper v2 (Eq. 3) writes `(R_sem + R_spa)/2` and multiplies by an
  HPS term; the halving is a constant factor that group normalisation removes, and HPS is not part of this issue.
* sum: `R_PI + R_sem + R_spa + R_RI`, in [0, 4]: the paper's Table 6 "sum reward" ablation replaces the product of
  the rewards by their sum; it publishes no formula, so we read it as every `*` of the product turned into `+`
  (the components unweighted, like the product). It scores worse there (2D-Spatial 0.2254 vs 0.2674).

A component's name (`R_PI`, ...) as the combination takes that component alone (`GRPOConfig.reward_combination`).
`weights` scale the columns before combining (`GRPOConfig.reward_weights`); all ones gives the formulas above.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from gotr1.rewards.protocol import COMPONENTS, RewardBreakdown
from kernels.advantages import combine_rewards

Combination = Literal["product", "sum", "R_PI", "R_sem", "R_spa", "R_RI"]
COMBINATIONS = ("product", "sum", *COMPONENTS)


def advantage_combine(combination: str) -> Literal["product", "sum"] | int:
    """`combination` as the advantage op's `combine`: the formula's name, or the component's column."""
    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; choose one of {COMBINATIONS}")
    return COMPONENTS.index(combination) if combination in COMPONENTS else combination  # type: ignore[return-value]


def combine(components: torch.Tensor, combination: Combination = "product",
            weights: Sequence[float] | None = None) -> torch.Tensor:
    """`[B, 4]` components in `COMPONENTS` order -> `[B]` totals (the torch reference for the advantage op)."""
    if components.ndim != 2 or components.shape[1] != len(COMPONENTS):
        raise ValueError(f"components must be [B, {len(COMPONENTS)}] in order {COMPONENTS}, got "
                         f"{tuple(components.shape)}")
    if not bool(torch.isfinite(components).all()):
        bad = (~torch.isfinite(components)).nonzero()[0].tolist()
        raise ValueError(f"reward components must be finite, got {components[bad[0], bad[1]].item()} for "
                         f"{COMPONENTS[bad[1]]} of sample {bad[0]}")
    if not components.is_floating_point():
        components = components.float()  # fractional weights must not be truncated to an integer dtype
    if weights is not None:
        if len(weights) != len(COMPONENTS):
            raise ValueError(f"weights must hold {len(COMPONENTS)} numbers {COMPONENTS}, got {list(weights)}")
        w = torch.as_tensor(weights, dtype=components.dtype, device=components.device)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite in {components.dtype}, got {list(weights)}")
        components = components * w
    return combine_rewards(components, advantage_combine(combination))


def reward_fn(breakdown: RewardBreakdown, combination: Combination = "product",
              weights: Sequence[float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Totals `[B]` for GRPO and the log line: every component's mean, the unparsable counts and the total's mean."""
    totals = combine(breakdown.as_matrix(), combination, weights)
    metrics = breakdown.metrics()
    metrics["reward/total"] = float(totals.mean()) if len(totals) else 0.0
    return totals, metrics
