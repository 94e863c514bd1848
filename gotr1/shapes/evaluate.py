"""Held-out evaluation in the shapes world: sample with the engine, score with the exact judge, tabulate.

`gotr1 eval` and the before/after table of `gotr1 train --preset shapes` both come from here, so the two can
never measure differently: same engine, same sampling settings, same per-prompt seeds.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gotr1.config import EvalConfig, sampling_params
from gotr1.rewards.combine import combine
from gotr1.rewards.protocol import COMPONENTS, reward_samples
from gotr1.shapes.judge import ShapesJudge, Verdict, breakdown, summarise
from gotr1.shapes.world import CATEGORIES, parse_prompts

COLUMNS = ("total", "accuracy", *COMPONENTS)


@dataclass
class EvalResult:
    config: EvalConfig
    verdicts: list[Verdict]
    summary: dict[str, dict[str, float]]
    groups: list  # the engine's GroupOutputs, for saving images

    def to_json(self) -> dict:
        """Settings, per-category and overall means, and every sample's components and exact-match flag."""
        samples = [{"prompt": v.prompt, "category": v.category, "exact_match": v.exact_match, "total": t,
                    **{c: getattr(v, c) for c in COMPONENTS}}
                   for v, t in zip(self.verdicts, _totals(self.verdicts, self.config.reward_combination))]
        return {"settings": asdict(self.config), "summary": self.summary, "samples": samples}


def _totals(verdicts: Sequence[Verdict], combination: str) -> list[float]:
    return combine(breakdown(verdicts).as_matrix(), combination).tolist() if verdicts else []  # type: ignore[arg-type]


def evaluate(bundle, prompts: Sequence[str], config: EvalConfig | None = None, engine=None,
             progress: bool = True) -> EvalResult:
    """Generate `config.n` samples per prompt and judge them. Prompts are checked against the world's grammar
    first (`PromptParseError` names the line), so nothing is generated for a file that cannot be scored."""
    from engine import LLMEngine

    config = config or EvalConfig()
    if not prompts:
        raise ValueError("no prompts to evaluate")
    parse_prompts(prompts)
    params = [sampling_params(config, n=config.n, seed=config.seed + i) for i in range(len(prompts))]
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with torch.no_grad():
            groups = (engine or LLMEngine(bundle)).generate(list(prompts), params, use_tqdm=progress)
    finally:  # a failed evaluation inside a training run must not leave the policy in eval mode
        bundle.model.train(was_training)
    verdicts = ShapesJudge().verdicts(reward_samples(groups))
    return EvalResult(config, verdicts, summarise(verdicts, config.reward_combination), groups)


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Per-category rows of each column for one or several labelled summaries (`{"SFT": ..., "GRPO": ...}`);
    with two, a last column gives the relative change of the total reward."""
    labels = list(results)
    first = results[labels[0]]
    rows = [c for c in (*CATEGORIES, "overall") if c in first]
    head = ["category", "n"] + [f"{col} {label}" for col in COLUMNS for label in labels]
    if len(labels) == 2:
        head.append("total change")
    table = [head]
    for r in rows:
        line = [r, str(int(first[r]["n"]))]
        line += [f"{results[label][r][col]:.3f}" for col in COLUMNS for label in labels]
        if len(labels) == 2:
            a, b = (results[label][r]["total"] for label in labels)
            line.append(f"{(b - a) / a:+.1%}" if a > 0 else "n/a")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
