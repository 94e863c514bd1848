"""Shared result schema, timing and table printing for every `python -m bench <name>` script."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def device_name(device: str) -> str:
    """Human-readable name of the device a figure was measured on (recorded with every result)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def git_commit() -> str:
    """HEAD's short hash; `$GOTR1_GIT_COMMIT` where the tree has no .git (a copy sent to a GPU machine)."""
    if os.environ.get("GOTR1_GIT_COMMIT"):
        return os.environ["GOTR1_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict[str, Any]:
    import transformers

    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], *, device: str, warmup: int = 1, repeats: int = 5) -> tuple[float, Any]:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup`; returns (median, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_memory(fn: Callable[[], Any], *, device: str) -> int:
    """Peak bytes allocated by `fn()`: the CUDA allocator's peak on GPU, torch's CPU profiler on CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    for event in events:
        current += event.cpu_memory_usage
        peak = max(peak, current)
    return peak


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Readable fixed-width table of `rows` (all rows share the first row's keys)."""
    if not rows:
        return
    keys = list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n{title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def write_result(name: str, args: Any, metrics: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> dict:
    """Write the common schema {benchmark, env, args, metrics, rows} to `args.json` and print a table."""
    result = {
        "benchmark": name,
        "env": environment(args.device),
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "metrics": metrics,
        "rows": rows or [],
    }
    title = f"{name} on {result['env']['device_name']}"
    print_table(title, [{"metric": k, "value": v} for k, v in metrics.items() if not isinstance(v, dict)])
    print_table(f"{title}: per case", rows or [])
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")
    return result
