"""The main job, timed: `gotr1 train --preset shapes` exactly as `make demo` runs it (GRPO in the shapes world
between two held-out evaluations), in a child process, then its run directory summarised.

Reported: wall time, median GRPO step time, the training reward averaged per 50 steps, and the held-out table
before and after training (per category: every reward component, the total, exact-match accuracy) with the
change of the total. The run directory is replaced, so the figures are this run's alone.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_result


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/shapes-grpo", help="the run directory (replaced)")
    parser.add_argument("--train-args", default="", help="more `gotr1 train` flags, quoted (e.g. '--max-steps 20')")


def run(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    command = ["train", "--preset", "shapes", "--device", args.device, "--output-dir", str(out),
               *shlex.split(args.train_args)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gotr1.cli", *command], check=True)
    wall = time.perf_counter() - start
    metrics, rows = summarise(out)
    return write_result("shapes", args, {"command": "gotr1 " + shlex.join(command), "wall_seconds": wall, **metrics},
                        rows)


def summarise(run_dir: Path) -> tuple[dict, list[dict]]:
    """A finished run's figures (from its `metrics.jsonl` and `eval.json`) and its table, a row per category."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward/mean"] for m in history]
    evaluations = json.loads((run_dir / "eval.json").read_text())
    (_, before), (_, after) = sorted(evaluations.items(), key=lambda kv: int(kv[0].split()[-1]))
    before, after, settings = before["summary"], after["summary"], before["settings"]
    change = {c: after[c]["total"] / before[c]["total"] - 1 for c in before}
    metrics = {
        "steps": len(history), "median_step_seconds": statistics.median(m["time/step"] for m in history),
        "train_reward_mean_per_50_steps": [statistics.fmean(rewards[i:i + 50]) for i in range(0, len(rewards), 50)],
        "eval_settings": settings, "before": before, "after": after, "total_change": change,
    }
    rows = [{"category": c, "total_before": before[c]["total"], "total_after": after[c]["total"], "change": change[c],
             "accuracy_before": before[c]["accuracy"], "accuracy_after": after[c]["accuracy"]} for c in before]
    return metrics, rows
