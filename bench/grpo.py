"""Seconds per GRPO step (prompts x num_generations samples), split into rollout / reward / train.

Then, on the trained LoRA policy, one step's rollout with the LoRA projections merged into the engine's weight
buffers vs applied inline (`EngineConfig.merge_lora`), alternating, `--lora-repeats` times each: medians, their
ratio and whether the two sides sampled the same tokens.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

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
    parser.add_argument("--lora-repeats", type=int, default=3,
                        help="rollouts per side of the merged-vs-inline LoRA comparison (0: skip it)")


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
        lora = _merge_lora_ab(trainer, prompts[:args.prompts_per_step], args) if args.lora_repeats else {}
    measured = history[1:]
    keys = ("time/rollout", "time/reward", "time/train", "time/step")
    med = {k: statistics.median(h[k] for h in measured) for k in keys}
    samples = args.prompts_per_step * args.num_generations
    metrics = {
        "seconds_per_step": med["time/step"], "rollout_s": med["time/rollout"], "reward_s": med["time/reward"],
        "train_s": med["time/train"], "rollout_fraction": med["time/rollout"] / med["time/step"],
        "samples_per_step": samples, "samples_per_s": samples / med["time/step"],
        "image_tokens": bundle.num_image_tokens, "max_reasoning_tokens": args.max_reasoning_tokens, **lora,
    }
    rows = [{"step": h["step"], **{f"{k.removeprefix('time/')}_s": h[k] for k in keys},
             "reward_mean": h["reward/mean"]} for h in measured]
    return write_result("grpo", args, metrics, rows)


def _merge_lora_ab(trainer, prompts: list[str], args) -> dict:
    """One step's rollout on the trained policy, LoRA merged vs inline, same seeds, alternating."""
    from engine import LLMEngine
    from gotr1.config import sampling_params

    config = trainer.config
    params = [sampling_params(config, n=config.num_generations, seed=i, decode_images=False)
              for i in range(len(prompts))]
    sides = {merge: LLMEngine(trainer.bundle, dataclasses.replace(trainer.engine.config, merge_lora=merge))
             for merge in (True, False)}
    seconds: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    with torch.no_grad():
        for _ in range(args.lora_repeats):
            for merge, engine in sides.items():
                start = time.perf_counter()
                groups = engine.generate(prompts, params, use_tqdm=False)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[merge].append(time.perf_counter() - start)
                tokens[merge] = [(s.reasoning_ids, s.image_tokens.tolist()) for g in groups for s in g.samples]
    merged, inline = (statistics.median(seconds[m]) for m in (True, False))
    same = sum(a == b for a, b in zip(tokens[True], tokens[False])) / len(tokens[True])
    return {"rollout_s_lora_merged": merged, "rollout_s_lora_inline": inline,
            "merge_lora_speedup": inline / merged, "merge_lora_same_samples": same}
