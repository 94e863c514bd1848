"""Which judges need VQ-decoded images (GRPO skips decoding for the others), and what a pixel judge does without."""
import pytest
import torch

from gotr1.chain import ParsedChain
from gotr1.rewards import (
    CodebookSubsetJudge,
    Judge,
    JudgeConfig,
    RewardBreakdown,
    RewardSample,
    build_tiny_qwen_judge,
    make_judge,
    needs_images,
)


class LegacyJudge:
    """A judge written before `needs_images` existed."""

    def score(self, samples):
        ones = torch.ones(len(samples))
        return RewardBreakdown(R_PI=ones, R_sem=ones, R_spa=ones, R_RI=ones)


def test_only_token_judges_go_without_images():
    assert not needs_images(CodebookSubsetJudge(3)) and not needs_images(make_judge("codebook:3"))
    assert isinstance(CodebookSubsetJudge(3), Judge)
    assert needs_images(make_judge("shapes"))
    legacy = LegacyJudge()
    assert isinstance(legacy, Judge) and needs_images(legacy)  # still a Judge, and gets pixels (the safe default)
    legacy.needs_images = False
    assert not needs_images(legacy)
    legacy.needs_images = "no"
    with pytest.raises(TypeError, match="needs_images must be a bool"):
        needs_images(legacy)


def test_pixel_judges_refuse_a_sample_without_its_image_by_name():
    """A sample whose image tokens were never decoded: a clear ValueError from every pixel judge, while the token
    judge scores it."""
    sample = RewardSample("a red circle left of a blue square", ParsedChain(),
                          image_tokens=torch.tensor([0, 1, 5, 9]))
    assert sample.image is None
    qwen = build_tiny_qwen_judge(seed=0, config=JudgeConfig(image_size=56, max_new_tokens_score=2,
                                                            max_new_tokens_box=2))
    for judge in (make_judge("shapes"), qwen):
        assert needs_images(judge)
        with pytest.raises(ValueError, match=r"no image \(RewardSample.image is None"):
            judge.score([sample])
    assert CodebookSubsetJudge(5).score([sample]).R_PI.tolist() == [0.5]
