"""Exact judges for tests and ablations: rewards computed by code, behind the same `Judge` protocol."""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from gotr1.rewards.protocol import RewardBreakdown, RewardSample


class CodebookSubsetJudge:
    """R_PI = the share of a sample's image tokens below `subset_size` (the other components are 1).

    A reward a policy can only raise by moving its image-token distribution: the smallest honest signal that
    GRPO changes what the engine samples (the tiny preset's random weights draw a picture of nothing). It reads
    codes only, so GRPO does not VQ-decode images for it.
    """

    needs_images: ClassVar[bool] = False

    def __init__(self, subset_size: int):
        if subset_size < 1:
            raise ValueError(f"subset_size must be >= 1, got {subset_size}")
        self.subset_size = subset_size

    def score(self, samples: Sequence[RewardSample]) -> RewardBreakdown:
        if any(s.image_tokens is None for s in samples):
            raise ValueError("CodebookSubsetJudge needs the samples' image_tokens")
        share = torch.stack([(s.image_tokens < self.subset_size).float().mean() for s in samples]) \
            if samples else torch.zeros(0)
        ones = torch.ones_like(share)
        return RewardBreakdown(R_PI=share, R_sem=ones, R_spa=ones, R_RI=ones)
