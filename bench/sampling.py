"""Time per decode step of the fused CFG + sampling op vs an eager torch sampler (issue 9).

Shapes: 32 x 16384 CFG pairs (image tokens) and 16 x 102400 unpaired rows (text tokens), each with filters off
(temperature only) and with top-k 50 + top-p 0.9.  `fused` is `cfg_sample` (the CUDA kernel on --device cuda
when the extension builds; the vectorised torch path otherwise, as on CPU); `torch_path` is the torch path
timed on the same device; `eager` is the usual separate-op sampler: mix, temperature, topk threshold, sort +
cumsum top-p, softmax, multinomial, two log_softmax + gather.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from bench.common import median_time, write_result
from kernels.cfg_sampling import cfg_sample, cfg_sample_torch, cuda_extension_available

CASES = (("image", 32, 16384, True), ("text", 16, 102400, False))
FILTERS = (("none", 0, 1.0), ("top-k 50, top-p 0.9", 50, 0.9))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="logit dtype, as the LM head returns it")


def eager_step(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_weight: torch.Tensor,
               temperature: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, ...]:
    """One step with separate torch ops (HF/vLLM-style), the baseline the fused op replaces."""
    c = cond.float()
    mixed = c if uncond is None else uncond.float() + cfg_weight[:, None] * (c - uncond.float())
    scaled = mixed / temperature[:, None]
    logits = scaled
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs_sorted = ordered.softmax(dim=-1)
        drop = probs_sorted.cumsum(dim=-1) - probs_sorted >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
    tokens = torch.multinomial(logits.softmax(dim=-1), 1)
    mixed_logprobs = scaled.log_softmax(dim=-1).gather(1, tokens)[:, 0]
    logprobs = mixed_logprobs if uncond is None else (c / temperature[:, None]).log_softmax(-1).gather(1, tokens)
    return tokens[:, 0], logprobs, mixed_logprobs


def time_case(cond: torch.Tensor, uncond: torch.Tensor | None, params: dict[str, torch.Tensor], top_k: int,
              top_p: float, args: argparse.Namespace, torch_path: bool) -> dict[str, float]:
    """Median milliseconds per step of eager, fused (and the torch path when `fused` is the kernel)."""
    timing = dict(warmup=args.warmup, repeats=args.repeats, device=args.device)
    eager_s, _ = median_time(lambda: eager_step(cond, uncond, params["cfg_weight"], params["temperature"],
                                                top_k, top_p), **timing)
    fused_s, _ = median_time(lambda: cfg_sample(cond, uncond, **params, validate=False), **timing)
    result = {"eager_ms": eager_s * 1e3, "fused_ms": fused_s * 1e3, "eager_over_fused": eager_s / fused_s}
    if torch_path:
        torch_s, _ = median_time(lambda: cfg_sample_torch(cond, uncond, **params, validate=False), **timing)
        result["torch_path_ms"] = torch_s * 1e3
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = args.device, getattr(torch, args.dtype)
    fused_backend = "cuda kernel" if device.startswith("cuda") and cuda_extension_available() else "torch path"
    rows_out = []
    for name, rows, vocab, paired in CASES:
        g = torch.Generator().manual_seed(0)
        cond = (torch.randn(rows, vocab, generator=g) * 4).to(device=device, dtype=dtype)
        uncond = (torch.randn(rows, vocab, generator=g) * 4).to(device=device, dtype=dtype) if paired else None
        for label, top_k, top_p in FILTERS:
            params = dict(cfg_weight=torch.full((rows,), 5.0, device=device),
                          temperature=torch.full((rows,), 1.0, device=device),
                          top_k=torch.full((rows,), top_k, dtype=torch.int64, device=device),
                          top_p=torch.full((rows,), top_p, device=device),
                          seeds=torch.arange(rows, device=device), counters=torch.full((rows,), 7, device=device))
            row = {"case": f"{name} {rows}x{vocab}{' pairs' if paired else ''}", "filters": label,
                   **time_case(cond, uncond, params, top_k, top_p, args, torch_path=fused_backend != "torch path")}
            rows_out.append(row)
    metrics = {"fused_backend": fused_backend, "dtype": args.dtype,
               **{f"{r['case']} / {r['filters']}: eager_over_fused": r["eager_over_fused"] for r in rows_out}}
    return write_result("sampling", args, metrics, rows_out)
