"""Seconds per GRPO step (prompts x num_generations samples), split into rollout / reward / train."""
from __future__ import annotations

import statistics
import tempfile

import torch

from bench.common import write_result


def add_args(parser) -> None:
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=None,
                        help="tiny preset only: image side (64 -> 16 image tokens; default 384 -> 576)")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=16)
    parser.add_argument("--max-reasoning-tokens", type=int, default=64)
    parser.add_argument("--judge", default="codebook:512", help="GRPOConfig.judge spec")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def run(args) -> dict:
    from gotr1.config import GRPOConfig
    from gotr1.grpo import GRPOTrainer
    from gotr1.model import build_preset
    from gotr1.rewards import make_judge

    overrides = {"image_size": args.image_size} if args.image_size and args.preset == "tiny" else {}
    bundle = build_preset(args.preset, dtype=getattr(torch, args.dtype), device=args.device, **overrides)
    prompts = [f"{c} {s} left of a {c2} {s2}" for c, c2 in (("red", "blue"), ("green", "yellow"))
               for s, s2 in (("circle", "square"), ("star", "triangle"), ("cat", "dog"), ("cup", "bowl"))]
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, num_generations=args.num_generations,
                            prompts_per_step=args.prompts_per_step, max_reasoning_tokens=args.max_reasoning_tokens,
                            judge=args.judge, max_steps=args.steps + 1, save_steps=10**9, sample_steps=0,
                            dtype=args.dtype)
        trainer = GRPOTrainer(config, bundle, prompts, make_judge(args.judge, device=args.device))
        history = trainer.train()
    measured = history[1:]
    keys = ("time/rollout", "time/reward", "time/train", "time/step")
    med = {k: statistics.median(h[k] for h in measured) for k in keys}
    samples = args.prompts_per_step * args.num_generations
    metrics = {
        "seconds_per_step": med["time/step"], "rollout_s": med["time/rollout"], "reward_s": med["time/reward"],
        "train_s": med["time/train"], "rollout_fraction": med["time/rollout"] / med["time/step"],
        "samples_per_step": samples, "samples_per_s": samples / med["time/step"],
        "image_tokens": bundle.num_image_tokens, "max_reasoning_tokens": args.max_reasoning_tokens,
    }
    rows = [{"step": h["step"], **{f"{k.removeprefix('time/')}_s": h[k] for k in keys},
             "reward_mean": h["reward/mean"]} for h in measured]
    return write_result("grpo", args, metrics, rows)
