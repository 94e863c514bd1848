"""GoT-R1's reward: R_total = R_PI * (R_sem + R_spa) * R_RI from a multimodal judge (or exact code) per sample."""
from gotr1.rewards.combine import COMBINATIONS, Combination, combine, reward_fn
from gotr1.rewards.exact import CodebookSubsetJudge
from gotr1.rewards.geometry import iou, judge_frame, judge_to_got, mean_iou
from gotr1.rewards.parsing import expected_score, parse_box, parse_score, scale_score
from gotr1.rewards.protocol import COMPONENTS, Judge, RewardBreakdown, RewardSample, needs_images, reward_samples
from gotr1.rewards.qwen import (
    JUDGE_PRESETS,
    ImageOnlyQwenProcessor,
    JudgeConfig,
    QwenVLJudge,
    build_qwen_judge_preset,
    build_tiny_qwen_judge,
    check_judge_dir,
    load_qwen_judge,
    make_qwen_judge,
    save_judge,
)

__all__ = [
    "COMBINATIONS", "COMPONENTS", "CodebookSubsetJudge", "Combination", "ImageOnlyQwenProcessor", "JUDGE_PRESETS",
    "Judge", "JudgeConfig", "QwenVLJudge", "RewardBreakdown", "RewardSample", "build_qwen_judge_preset",
    "build_tiny_qwen_judge", "check_judge_dir", "combine", "expected_score", "iou", "judge_frame", "judge_to_got",
    "load_qwen_judge", "make_judge", "make_qwen_judge", "mean_iou", "needs_images", "parse_box", "parse_score",
    "reward_fn", "reward_samples", "save_judge", "scale_score",
]


def make_judge(spec: str, *, device: str = "cpu", seed: int = 0) -> Judge:
    """`GRPOConfig.judge`, resolved at start-up so missing weights fail before any rollout:

    - `shapes`: the exact judge of the synthetic shapes world;
    - `codebook:K`: exact, the share of image tokens below K (tests, sanity runs);
    - a Qwen2.5-VL preset (`tiny-qwen`, `qwen2.5-vl-7b-shape`) or a local Qwen2.5-VL directory.
    """
    if spec == "shapes":
        from gotr1.shapes.judge import ShapesJudge

        return ShapesJudge()
    if spec.startswith("codebook:"):
        try:
            return CodebookSubsetJudge(int(spec.split(":", 1)[1]))
        except ValueError as e:
            raise ValueError(f"judge {spec!r}: expected codebook:K with an integer K >= 1 ({e})") from e
    return make_qwen_judge(spec, seed=seed, device=device)
