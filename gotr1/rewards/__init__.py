"""GoT-R1's reward: R_total = R_PI * (R_sem + R_spa) * R_RI from a multimodal judge (or exact code) per sample."""
from gotr1.rewards.combine import COMBINATIONS, Combination, combine, reward_fn
from gotr1.rewards.geometry import iou, judge_frame, judge_to_got, mean_iou
from gotr1.rewards.parsing import expected_score, parse_box, parse_score, scale_score
from gotr1.rewards.protocol import COMPONENTS, Judge, RewardBreakdown, RewardSample
from gotr1.rewards.qwen import (
    JUDGE_PRESETS,
    ImageOnlyQwenProcessor,
    JudgeConfig,
    QwenVLJudge,
    build_qwen_judge_preset,
    build_tiny_qwen_judge,
    check_judge_dir,
    load_qwen_judge,
    make_judge,
    save_judge,
)

__all__ = [
    "COMBINATIONS", "COMPONENTS", "JUDGE_PRESETS", "Combination", "ImageOnlyQwenProcessor", "Judge", "JudgeConfig",
    "QwenVLJudge", "RewardBreakdown", "RewardSample", "build_qwen_judge_preset", "build_tiny_qwen_judge",
    "check_judge_dir", "combine", "expected_score", "iou", "judge_frame", "judge_to_got", "load_qwen_judge",
    "make_judge", "mean_iou", "parse_box", "parse_score", "reward_fn", "save_judge", "scale_score",
]
