"""HTTP serving: latency at concurrency 1, 4, 16 and throughput against the offline engine.

The server (`gotr1.serving`) runs in this process on loopback; the clients run in a child process (in this one
they would hold the server's GIL): `c` client threads each send streaming requests back to back,
`rounds * c` requests per level. Every request asks for `n` samples of exactly R reasoning tokens (min = max)
and the decoded image, with its own seed. Measured at the client: time to the first `token` event (TTFT) and
to the first `image` event; p50/p99 over the level's requests (with few requests, p99 is close to the
maximum). Per level also: samples/s over its wall time, the engine's forwards (`gotr1_engine_steps_total`:
one per decode step or prefill, up to `--num-scheduler-steps` per scheduled batch) and the fraction of the wall
time the engine spent inside its scheduled batches.

With `--request-rate R`, an open-loop level follows (vLLM's `benchmark_serving --request-rate`): requests
arrive at Poisson times of rate R whatever the server's state, so they land in the middle of multi-step decode
windows. It runs on the same arrival times and seeds with the server's window interrupts (a request that arrives ends
the window at its next step) and without them (it waits for the rest of the window), `--open-loop-rounds`
times each, alternating; each side's percentiles pool its rounds' requests. `ttft_p50_ratio_uninterrupted`
is the second side's TTFT p50 over the first's.

Throughput is compared with `LLMEngine.generate` of the largest closed level's requests (no HTTP, no PNG,
images decoded inside the engine), all in one call (its best case) and in chunks of the largest concurrency;
`match_offline` says whether the server's tokens equal the offline ones (same seeds). On a small CPU the
clients still share the cores with the server.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch

from bench.common import median_time, write_result
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from gotr1.model import build_preset, load_model
from gotr1.serving import BackgroundServer, ServerConfig, create_app

PROMPTS = ("a red cat sitting on a wooden table next to a blue cup", "two green apples and a yellow banana",
           "a small dog in front of a large house", "three purple stars above a white circle")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, janus-pro-1b-shape, ...)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="tiny only: image side in pixels (64 = 16 image tokens; default 384 = 576)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--n", type=int, default=1, help="samples per request")
    parser.add_argument("--reasoning-tokens", type=int, default=32, help="reasoning tokens per sample")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="default: the engine's sizing")
    parser.add_argument("--num-scheduler-steps", type=int, default=EngineConfig().num_scheduler_steps,
                        help="decode steps per host sync")
    parser.add_argument("--request-rate", type=float, default=0.0,
                        help="requests/s of an open-loop Poisson level, run with and without window interrupts "
                             "(0: none)")
    parser.add_argument("--open-loop-requests", type=int, default=32, help="requests of the open-loop level")
    parser.add_argument("--open-loop-rounds", type=int, default=3,
                        help="open-loop runs per side, alternating; percentiles pool their requests")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds, per request")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)


def _body(args: argparse.Namespace, i: int) -> dict:
    r = args.reasoning_tokens
    return {"prompt": PROMPTS[i % len(PROMPTS)], "n": args.n, "seed": args.seed + i, "max_reasoning_tokens": r,
            "min_reasoning_tokens": r, "return": ["image", "tokens"], "stream": True}


def _stream_one(client: httpx.Client, body: dict) -> dict:
    """One streaming request: client-side times to the first token and the first image, and the tokens."""
    start = time.perf_counter()
    first_token = first_image = None
    done = None
    with client.stream("POST", "/v1/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request failed with {r.status_code}: {r.read().decode()}")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
                now = time.perf_counter() - start
                if event == "token" and first_token is None:
                    first_token = now
                elif event == "image" and first_image is None:
                    first_image = now
                elif event == "error":
                    raise RuntimeError(f"request failed: {line}")
            elif event == "done" and line.startswith("data: "):
                done = json.loads(line[len("data: "):])
    if done is None or first_token is None or first_image is None:
        raise RuntimeError("the stream ended without its token, image and done events")
    return {"ttft": first_token, "tti": first_image, "total": time.perf_counter() - start,
            "tokens": [(s["reasoning_ids"], s["image_tokens"]) for s in done["samples"]]}


def _level(url: str, args: argparse.Namespace, concurrency: int, offset: int,
           rounds: int) -> tuple[float, list[dict]]:
    """`rounds * concurrency` requests from `concurrency` threads; returns (wall seconds, per-request results)."""
    bodies = [_body(args, offset + i) for i in range(rounds * concurrency)]
    lock, cursor = threading.Lock(), iter(range(len(bodies)))
    results: list[dict | None] = [None] * len(bodies)
    timeout = httpx.Timeout(args.request_timeout)

    def client_loop(client: httpx.Client) -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            results[i] = _stream_one(client, bodies[i])

    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client:
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(client_loop, client) for _ in range(concurrency)]:
                f.result(timeout=args.request_timeout * (rounds + 1))
    return time.perf_counter() - start, results  # type: ignore[return-value]


def _open_loop(url: str, args: argparse.Namespace, offset: int) -> tuple[float, list[dict]]:
    """`--open-loop-requests` requests sent at seeded Poisson arrival times of rate `--request-rate`, each on its
    own thread; returns (wall seconds, per-request results)."""
    n = args.open_loop_requests
    arrivals = np.cumsum(np.random.default_rng(args.seed).exponential(1.0 / args.request_rate, n))
    bodies = [_body(args, offset + i) for i in range(n)]
    timeout = httpx.Timeout(args.request_timeout)

    def send(i: int) -> dict:
        time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        return _stream_one(client, bodies[i])

    with httpx.Client(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=n)) as client:
        with ThreadPoolExecutor(n) as pool:
            start = time.perf_counter()
            futures = [pool.submit(send, i) for i in range(n)]
            results = [f.result(timeout=arrivals[-1] + args.request_timeout * n) for f in futures]
    return time.perf_counter() - start, results


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    if not levels or min(levels) < 1 or args.rounds < 1:
        raise ValueError(f"--concurrency needs positive counts and --rounds >= 1, got {args.concurrency!r}, "
                         f"{args.rounds}")
    if not args.request_rate >= 0 or min(args.open_loop_requests, args.open_loop_rounds) < 1:
        raise ValueError(f"--request-rate must be >= 0, --open-loop-requests and --open-loop-rounds >= 1, got "
                         f"{args.request_rate}, {args.open_loop_requests}, {args.open_loop_rounds}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.image_size is not None:
        if args.preset != "tiny":
            raise ValueError("--image-size only applies to the tiny preset")
        bundle = build_preset("tiny", seed=args.seed, dtype=dtype, device=args.device, image_size=args.image_size)
    else:
        bundle = load_model(args.preset, dtype=dtype, device=args.device, seed=args.seed)
    # Half the free GPU memory for each KV pool: the offline engine runs in the same process.
    config = EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=0.45,
                          enforce_eager=not args.device.startswith("cuda"),
                          num_scheduler_steps=args.num_scheduler_steps)
    max_queue = max(2 * max(levels), args.open_loop_requests)
    app = create_app(bundle, config, ServerConfig(max_n=max(args.n, 1), max_queue=max_queue))
    rows, served = [], {}
    # The clients run in a child process: in this one they would compete with the server for the GIL.
    with BackgroundServer(app) as server, multiprocessing.get_context("spawn").Pool(1) as clients:
        def level(c: int, offset: int, rounds: int) -> tuple[float, list[dict]]:
            return clients.apply_async(_level, (server.url, args, c, offset, rounds)).get(
                timeout=args.request_timeout * (rounds + 1) + 60)

        level(1, 10**6, 1)  # warm-up
        offset = 0
        # The metrics, not the engine: only the engine thread may read the engine (the counter adds its forwards).
        forwards, batches = app.state.server.metrics.steps_total, app.state.server.metrics.step_seconds

        def timed(run_level: Callable[[], tuple[float, list[dict]]]) -> tuple[float, list[dict], int, float]:
            """(wall, results, engine forwards, seconds inside scheduled batches) of one run."""
            count, busy = forwards.get(), batches.sum
            wall, results = run_level()
            return wall, results, int(forwards.get() - count), batches.sum - busy

        def row(name: str | int, runs: list[tuple[float, list[dict], int, float]]) -> list[dict]:
            """One table row over `runs` pooled: percentiles over all their requests, rates over their walls."""
            wall, forwards_run, busy = (sum(r[i] for r in runs) for i in (0, 2, 3))
            results = [x for r in runs for x in r[1]]
            ttft, tti = [r["ttft"] for r in results], [r["tti"] for r in results]
            rows.append({"concurrency": name, "requests": len(results), "ttft_p50_s": _pct(ttft, 50),
                         "ttft_p99_s": _pct(ttft, 99), "tti_p50_s": _pct(tti, 50), "tti_p99_s": _pct(tti, 99),
                         "samples_per_s": len(results) * args.n / wall, "wall_s": wall, "forwards": forwards_run,
                         "engine_busy": busy / wall})
            return results

        for c in levels:
            served[c] = (offset, row(c, [timed(lambda c=c, o=offset: level(c, o, args.rounds))]))
            offset += len(served[c][1])
        open_loop = []
        if args.request_rate:
            worker = app.state.server.worker
            runs: dict[bool, list] = {True: [], False: []}
            for _ in range(args.open_loop_rounds):  # alternating, on the same arrival times and seeds
                for interrupt in runs:
                    worker.interrupt_windows = interrupt
                    runs[interrupt].append(timed(lambda: clients.apply_async(_open_loop, (
                        server.url, args, offset)).get(timeout=args.request_timeout * args.open_loop_requests + 60)))
            worker.interrupt_windows = True
            for interrupt, side in runs.items():
                name = f"poisson {args.request_rate:g}/s{'' if interrupt else ', windows not interrupted'}"
                open_loop.append(row(name, side))

    # The offline engine on the largest level's requests.
    top = max(levels)
    first, results = served[top]
    bodies = [_body(args, first + i) for i in range(len(results))]
    params = [SamplingParams(n=b["n"], seed=b["seed"], max_reasoning_tokens=b["max_reasoning_tokens"],
                             min_reasoning_tokens=b["min_reasoning_tokens"]) for b in bodies]
    engine = LLMEngine(bundle, config)
    prompts = [b["prompt"] for b in bodies]

    def offline_in_chunks(size: int) -> list:
        return [g for i in range(0, len(bodies), size)
                for g in engine.generate(prompts[i:i + size], params[i:i + size], use_tqdm=False)]

    offline_rates = {}
    for name, size in (("offline_all", len(bodies)), (f"offline_chunks_of_{top}", top)):
        engine.num_steps = 0
        seconds, offline = median_time(lambda size=size: offline_in_chunks(size), device=args.device, warmup=1,
                                       repeats=1)
        offline_rates[name] = len(bodies) * args.n / seconds
        rows.append({"concurrency": name, "requests": len(bodies), **dict.fromkeys(
            ("ttft_p50_s", "ttft_p99_s", "tti_p50_s", "tti_p99_s"), float("nan")),
            "samples_per_s": offline_rates[name], "wall_s": seconds,
            "forwards": engine.num_steps // 2,  # warm-up + run
            "engine_busy": float("nan")})
    match = all([(s.reasoning_ids, s.image_tokens.tolist()) for s in g.samples] == r["tokens"]
                for g, r in zip(offline, results))
    if open_loop:  # interrupted windows or not, the same requests give the same tokens
        match = match and all(r["tokens"] == open_loop[0][i % args.open_loop_requests]["tokens"]
                              for side in open_loop for i, r in enumerate(side))
    top_rate = next(r for r in rows if r["concurrency"] == top)["samples_per_s"]
    metrics = {"preset": args.preset, "dtype": str(dtype).removeprefix("torch."),
               "image_tokens": bundle.num_image_tokens, "n": args.n, "reasoning_tokens": args.reasoning_tokens,
               "rounds": args.rounds, **{f"{k}_samples_per_s": v for k, v in offline_rates.items()},
               "served_samples_per_s_at_max_concurrency": top_rate,
               **{f"served_vs_{k}": top_rate / v for k, v in offline_rates.items()}, "match_offline": match,
               **{f"{k}_c{r['concurrency']}": r[k] for r in rows[:len(levels)]
                  for k in ("ttft_p50_s", "ttft_p99_s", "tti_p50_s", "tti_p99_s", "samples_per_s")}}
    if open_loop:
        cut, whole = rows[len(levels):len(levels) + 2]
        metrics |= {"request_rate": args.request_rate, "open_loop_rounds": args.open_loop_rounds,
                    **{f"{k}_open_loop{suffix}": r[k] for r, suffix in ((cut, ""), (whole, "_uninterrupted"))
                       for k in ("ttft_p50_s", "ttft_p99_s", "tti_p50_s", "samples_per_s")},
                    "ttft_p50_ratio_uninterrupted": whole["ttft_p50_s"] / cut["ttft_p50_s"]}
    return write_result("serve", args, metrics, rows)
