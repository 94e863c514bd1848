"""Reward judge throughput: batched `expected` scoring (CUDA graphs on GPU) vs one-at-a-time generate-and-parse.

Both sides run the whole `Judge.score` (R_PI, R_sem, R_spa and the R_RI grounding of every planned object) on the
same judge weights and the same samples: the batched side scores every rubric prompt in one bucketed forward and
decodes all grounding queries together; the single side handles one sample at a time, decoding every answer
(scores and boxes) with batch size 1, as a straightforward port of the paper's judge would. Random-weight judges
rarely emit an end token, so both sides decode up to their token limits (the `decode_steps` counters say so).
`batched_matches_single` compares the batched `expected` scores with the same judge in `expected` mode one sample
at a time (fp32: 1e-5; bf16: 2e-2, since batch shapes pick different GEMM kernels).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import time

import numpy as np
import torch
from PIL import Image

from bench.common import median_time, synchronize, write_result
from gotr1.chain import ChainObject, format_chain
from gotr1.rewards import COMPONENTS, JUDGE_PRESETS, QwenVLJudge, RewardSample, build_qwen_judge_preset

NAMES = ("red cube", "blue ball", "green tree", "yellow car", "white dog", "black cat", "brown table", "pink cup")
RELATIONS = ("left of", "right of", "above", "below", "next to")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge-preset", default="tiny-qwen", choices=JUDGE_PRESETS)
    parser.add_argument("--samples", type=int, default=16, help="samples scored per call (one GRPO group)")
    parser.add_argument("--objects", type=int, default=4, help="planned objects per chain (GoT chains hold 2-5)")
    parser.add_argument("--image-px", type=int, default=384, help="side of the generated images (Janus: 384)")
    parser.add_argument("--judge-image-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the batched side (median)")
    parser.add_argument("--seed", type=int, default=0)


def make_samples(n: int, objects: int, px: int, seed: int) -> list[RewardSample]:
    """Seeded GoT-like samples: a relational prompt, a chain of `objects` boxes in prose, a noise image."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        names = rng.sample(NAMES, objects)
        boxes = []
        for _ in names:
            x1, y1 = rng.randrange(0, 700), rng.randrange(0, 700)
            boxes.append((x1, y1, x1 + rng.randrange(60, 300), y1 + rng.randrange(60, 300)))
        chain = format_chain([ChainObject(name, box) for name, box in zip(names, boxes)],
                             [f"The scene shows a {name} placed in the frame" for name in names] + ["."])
        prompt = f"a {names[0]} {rng.choice(RELATIONS)} a {names[1]}"
        image = Image.fromarray(np_rng.integers(0, 256, (px, px, 3), dtype=np.uint8))
        out.append(RewardSample.from_text(prompt, chain, image))
    return out


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    overrides = {"max_batch_size": args.max_batch_size}
    if args.judge_image_size is not None:
        overrides["image_size"] = args.judge_image_size
    start = time.perf_counter()
    batched = build_qwen_judge_preset(args.judge_preset, seed=args.seed, device=device, dtype=dtype)
    build_s = time.perf_counter() - start
    cfg = dataclasses.replace(batched.config, **overrides)
    batched = QwenVLJudge(batched.model, batched.processor, cfg, name=args.judge_preset)
    single_generate = QwenVLJudge(batched.model, batched.processor,
                                  dataclasses.replace(cfg, mode="generate", max_batch_size=1, cuda_graphs=False))
    single_expected = QwenVLJudge(batched.model, batched.processor,
                                  dataclasses.replace(cfg, max_batch_size=1, cuda_graphs=False))
    batched_generate = QwenVLJudge(batched.model, batched.processor, dataclasses.replace(cfg, mode="generate"))
    samples = make_samples(args.samples, args.objects, args.image_px, args.seed)

    def one_at_a_time(judge: QwenVLJudge) -> list:
        return [judge.score([s]) for s in samples]

    t_batched, result = median_time(lambda: batched.score(samples), device=device, warmup=1, repeats=args.repeats)
    t_batched_gen, _ = median_time(lambda: batched_generate.score(samples), device=device, warmup=1,
                                   repeats=args.repeats)
    single_generate.score(samples[:1])  # warm-up (kernels, allocator), then one timed pass
    counters_before = dict(single_generate.counters)
    t_single, _ = median_time(lambda: one_at_a_time(single_generate), device=device, warmup=0, repeats=1)
    single_work = {k: v - counters_before[k] for k, v in single_generate.counters.items()}
    synchronize(device)
    singles = one_at_a_time(single_expected)

    single_matrix = torch.cat([b.as_matrix() for b in singles])
    max_diff = float((single_matrix - result.as_matrix()).abs().max())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    n = len(samples)
    per_call = {k: v // (args.repeats + 1) for k, v in batched.counters.items()}
    metrics = {
        "judge": args.judge_preset,
        "dtype": str(dtype).removeprefix("torch."),
        "samples": n,
        "objects_per_sample": args.objects,
        "judge_image_size": cfg.image_size,
        "cuda_graphs": batched._scorer.use_graphs,
        "graphs_captured": len(batched._scorer.graphs),
        "build_s": build_s,
        "seconds_batched_expected": t_batched,
        "seconds_batched_generate": t_batched_gen,
        "seconds_single_generate": t_single,
        "samples_per_s_batched": n / t_batched,
        "samples_per_s_batched_generate": n / t_batched_gen,
        "samples_per_s_single": n / t_single,
        "speedup_batched": t_single / t_batched,
        "speedup_batched_generate": t_single / t_batched_gen,
        "batched_matches_single": max_diff <= tolerance,
        "max_abs_diff_batched_vs_single": max_diff,
        "tolerance": tolerance,
        "work_batched_per_call": per_call,
        "work_single_generate": single_work,
        "mean_components_batched": {c: float(getattr(result, c).mean()) for c in COMPONENTS},
        "unparsable_batched": result.unparsable,
    }
    rows = [
        {"side": "batched expected", "seconds": t_batched, "samples_per_s": n / t_batched,
         "speedup": t_single / t_batched},
        {"side": "batched generate", "seconds": t_batched_gen, "samples_per_s": n / t_batched_gen,
         "speedup": t_single / t_batched_gen},
        {"side": "one-at-a-time generate", "seconds": t_single, "samples_per_s": n / t_single, "speedup": 1.0},
    ]
    write_result("reward", args, metrics, rows)
    return metrics
