"""GoT rollouts: the engine against the transformers reference generator, same weights, same settings.

Each group is one prompt with N samples: exactly R reasoning tokens (min = max, so both sides do identical work),
the forced `<begin_of_image>`, then all image tokens with CFG. Both sides sample (temperatures 1, no top-k/top-p,
GoT-R1's recipe) with the same torch thread count; `hf_match` comes from a separate small greedy run whose tokens
must be equal on both sides (it also warms both up). Then every side runs once untimed at the timed settings, so
what a side pays only on its first run at a shape (Triton specialisations, allocator growth, transformers' image
cache) is in no side's timed runs. The timed rollouts alternate engine / transformers, so load from other
processes on a shared machine hits both alike; each side's figure is its median. A third side is the
same engine with multi-step decoding off (`num_scheduler_steps=1`: a host sync after every step), so the gain of
keeping the device fed is measured in the same run; its tokens must equal the multi-step engine's. A fourth is the
same engine with `fuse_projections` the other way from its default (fused on a GPU: q/k/v and gate/up as one matmul
each, on the same weights): the same work, tokens equal up to the matmuls' roundings (`other_fusion_tokens_match`
says whether they were); `fused_projections_speedup` is unfused time over fused time. On a GPU,
`--compare-skinny-matmul` adds the same engine with `skinny_matmul` the other way (`skinny_matmul_speedup`: off
time over on time). `--compare-num-scheduler-steps K` adds the same engine with K-step decode windows, whose
tokens must be equal (`window_speedup`: default-window time over K-window time; on a GPU the device idles while
the host reads a window's tokens and schedules the next, so fewer, longer windows may close that gap).
`--compare-num-image-scheduler-steps M` likewise adds the engine with M-step image-only windows
(`image_window_speedup`: default time over M-step time; the default runs a group's image phase in one window).
`--compare-cascade-attn` adds the same engine with cascade attention the other way (`disable_cascade_attn`: a
run of rows reads its shared prefix once, or every row reads its own; `cascade_attn_speedup`: off time over on
time; `other_cascade_tokens_match` whether the tokens were equal: the same sums in another order).
On a Hopper GPU, `--compare-pdl` adds the engine with `enable_pdl` the other way (`pdl_speedup`: off time over on
time; `other_pdl_tokens_match`, expected true: the same kernels in the same order). An optional side that fails its
untimed first run (a GPU or Triton without the feature) is left out and named in `failed_sides`.
`--best-of-compared` then runs one more side, the engine with every compared setting that was faster by more than
`WIN_MARGIN` switched over (`winning_settings`), timed `--repeats` times after the others; `speedup_vs_hf_best` is
transformers' median over its median. When that switches `skinny_matmul` and PDL was compared, it runs with PDL
both ways (`best_candidates`), since PDL's comparison had cuBLAS between our kernels; the faster is
`best_settings`. The combination is measured, not inferred from its parts, and a short GPU lease gets it in the
same run; `--profile` then profiles it.
`--hf-compile` adds transformers' fastest configuration as one more side (`ReferenceGenerator(compile=True)`:
static caches, `torch.compile`d decoding, CUDA graphs on a GPU), warmed up at the timed shapes first, compile time
not counted: `speedup_vs_hf_compiled`.

Reported: groups/s and tokens/s per side and their ratio; KV bytes the engine held at its peak against the
contiguous cache transformers allocates (2N rows x (prompt + R + 1 + image tokens) for the image phase, its
largest); and the bandwidth floor of one decode step: the bytes a step must read (decoder weights + the step's
head + the K/V of every cached position a row attends, a position that rows share counted once: a group's prompt,
the unconditional rows' pad prefix) over the device's measured copy bandwidth, averaged over the text and image
steps of a rollout, against the engine's measured mean step time (meaningful on GPU; CPU steps are dominated
by per-operator overhead at the tiny preset). `floor_ms_per_step_per_row` counts every row's whole context
instead: what an engine without shared-prefix attention must read (the floor the results before cascade
attention reported).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from bench.common import median_time, print_table, synchronize, write_result
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from gotr1.model import load_model
from gotr1.reference import ReferenceGenerator

PROMPTS = ("a red cat sitting on a wooden table next to a blue cup", "two green apples and a yellow banana",
           "a small dog in front of a large house", "three purple stars above a white circle")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, janus-pro-1b-shape, ...)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--groups", type=int, default=1, help="prompts per rollout")
    parser.add_argument("--n", type=int, default=16, help="samples per prompt (group size)")
    parser.add_argument("--reasoning-tokens", type=int, default=300, help="reasoning tokens per sample")
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--num-scheduler-steps", type=int, default=EngineConfig().num_scheduler_steps,
                        help="decode steps per host sync (the engine's multi-step window)")
    parser.add_argument("--num-image-scheduler-steps", type=int, default=EngineConfig().num_image_scheduler_steps,
                        help="decode steps per host sync of image-only windows (default: up to an image's end)")
    parser.add_argument("--skinny-matmul", action="store_true",
                        help="decode projections through kernels.skinny_matmul (EngineConfig.skinny_matmul)")
    parser.add_argument("--compare-skinny-matmul", action="store_true",
                        help="also time the engine with skinny_matmul the other way (GPU only: on a CPU the Triton "
                             "kernel would run under the interpreter)")
    parser.add_argument("--compare-num-scheduler-steps", type=int, default=None, metavar="K",
                        help="also time the engine with K-step windows (same tokens): on a GPU, whether longer "
                             "windows close the host gap at window boundaries (`window_speedup`)")
    parser.add_argument("--compare-num-image-scheduler-steps", type=int, default=None, metavar="M",
                        help="also time the engine with M-step image-only windows (same tokens; "
                             "`image_window_speedup`)")
    parser.add_argument("--compare-cascade-attn", action="store_true",
                        help="also time the engine with cascade attention the other way (`cascade_attn_speedup`)")
    parser.add_argument("--enable-pdl", action="store_true",
                        help="decode-step kernels with programmatic dependent launch (EngineConfig.enable_pdl; "
                             "Hopper GPUs)")
    parser.add_argument("--compare-pdl", action="store_true",
                        help="also time the engine with enable_pdl the other way (`pdl_speedup`; GPU only)")
    parser.add_argument("--best-of-compared", action="store_true",
                        help="then time the engine with every compared setting that was faster switched over "
                             "(`best_settings`, `speedup_vs_hf_best`); --profile profiles that engine")
    parser.add_argument("--hf-compile", action="store_true",
                        help="also time transformers with static caches and torch.compile (compiled untimed first)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per side, alternating (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both sides (default: 1 on cpu, where it is the faster choice "
                             "for both at the tiny preset; torch's default on cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="after timing, profile one more engine rollout: operator table to FILE, device busy "
                             "time and top operators to the JSON")


WIN_MARGIN = 0.01  # the H100's repeats of one engine side differed by about 1%


def winning_settings(metrics: dict, margin: float = WIN_MARGIN) -> dict:
    """The timed engine's settings (a `bench rollout` result's metrics) with each compared setting switched over
    that was faster by more than `margin`: a best guess from single switches, for a side that measures the
    combination. Keys are `rollout`'s settings; a setting not compared keeps the engine's value."""
    best = {"num_scheduler_steps": metrics["num_scheduler_steps"],
            "num_image_scheduler_steps": metrics["num_image_scheduler_steps"],
            "skinny_matmul": metrics["skinny_matmul"], "cascade_attn": metrics["cascade_attn"],
            "enable_pdl": metrics["enable_pdl"]}
    for key, ratio in (("skinny_matmul", "skinny_matmul_speedup"), ("cascade_attn", "cascade_attn_speedup"),
                       ("enable_pdl", "pdl_speedup")):  # each: the time off over the time on
        if abs(metrics.get(ratio, 1.0) - 1) > margin:
            best[key] = metrics[ratio] > 1
    for key, ratio in (("num_scheduler_steps", "window_speedup"),
                       ("num_image_scheduler_steps", "image_window_speedup")):  # the engine's time over the other's
        if metrics.get(ratio, 1.0) > 1 + margin:
            best[key] = metrics[f"other_{key}"]
    return best


def best_candidates(metrics: dict, margin: float = WIN_MARGIN) -> list[dict]:
    """The settings a best-of side times: `winning_settings`; and when that switches `skinny_matmul` and PDL was
    compared, the same with PDL the other way too. PDL overlaps a launch with its predecessor only between our
    Triton kernels, and its comparison ran with the other matmuls (cuBLAS's between our kernels, or ours)."""
    best = winning_settings(metrics, margin)
    if "pdl_speedup" in metrics and best["skinny_matmul"] != metrics["skinny_matmul"]:
        return [best, dict(best, enable_pdl=not best["enable_pdl"])]
    return [best]


def _tokens(groups) -> list:
    return [(s.reasoning_ids, s.image_tokens.tolist()) for g in groups for s in g]


def copy_bandwidth(device: str) -> float:
    """Bytes per second a plain device copy moves (read + write), the yardstick for memory-bound steps."""
    numel = (256 if device.startswith("cuda") else 64) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds, _ = median_time(lambda: dst.copy_(src), device=device, warmup=2, repeats=10)
    return 2 * src.numel() * src.element_size() / seconds


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def bandwidth_floor(bundle, *, groups: int, n: int, prompt_len: float, reasoning: int,
                    bandwidth: float) -> dict[str, float]:
    """Bytes one decode step must read, text and image phase (contexts at their mid-point), and the time floor.
    `prompt_len`: the mean over the groups (prompts of several lengths are not padded in the engine's cache).
    A position several rows attend through the same cached K/V is read once: a group's prompt by its `n`
    conditional rows, the pad prefix (prompt + chain long) by every unconditional row. The `_per_row` figures
    count every row's whole context."""
    janus = bundle.model
    lm = janus.model.language_model
    tc = janus.config.text_config
    elem = lm.embed_tokens.weight.element_size()
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * elem
    stack = _param_bytes(lm.layers) + _param_bytes(lm.norm)
    image_tokens = bundle.num_image_tokens
    rows = groups * n
    text_weights = stack + _param_bytes(janus.lm_head)
    image_weights = stack + _param_bytes(janus.model.generation_head) + _param_bytes(janus.model.generation_aligner)
    own_text, own_image = reasoning / 2, reasoning + 1 + image_tokens / 2  # a conditional row's own positions
    text_steps, image_steps = reasoning + 1, image_tokens
    floors = {"kv_bytes_per_token": kv_per_token}
    for suffix, text_kv, image_kv in (
            ("", groups * prompt_len + rows * own_text,
             groups * prompt_len + rows * own_image + prompt_len + reasoning + rows * (1 + image_tokens / 2)),
            ("_per_row", rows * (prompt_len + own_text), 2 * rows * (prompt_len + own_image))):
        text_bytes, image_bytes = text_weights + text_kv * kv_per_token, image_weights + image_kv * kv_per_token
        mean_bytes = (text_steps * text_bytes + image_steps * image_bytes) / (text_steps + image_steps)
        floors.update({f"step_bytes_text{suffix}": text_bytes, f"step_bytes_image{suffix}": image_bytes,
                       f"step_bytes_mean{suffix}": mean_bytes,
                       f"floor_ms_per_step{suffix}": mean_bytes / bandwidth * 1e3})
    return floors


def kernel_gaps(intervals: list[tuple[float, float]], short_us: float = 10.0) -> dict:
    """Where a device idles between kernels, from their (start, end) times in microseconds: the union of the
    intervals, then each gap between its pieces, short (at most `short_us`: the next kernel of a graph or of a
    queue already launched, its launch latency and the last one's tail) or long (the device waited for the host:
    a sync at a window's end, scheduling, Python). Many short gaps argue for fewer kernels or overlapped launches
    (programmatic dependent launch); long ones for keeping the host ahead."""
    short = long_ = 0.0
    num_short = num_long = 0
    end = None
    for start, stop in sorted(intervals):
        if end is not None and start > end:
            if start - end <= short_us:
                short, num_short = short + start - end, num_short + 1
            else:
                long_, num_long = long_ + start - end, num_long + 1
        end = stop if end is None else max(end, stop)
    return {"kernels": len(intervals), "gap_short_s": short / 1e6, "gaps_short": num_short,
            "gap_long_s": long_ / 1e6, "gaps_long": num_long}


def profile_rollout(engine: LLMEngine, prompts: list[str], params: SamplingParams, path: str) -> dict:
    """One engine rollout under torch's profiler. The operator table (by device self time on CUDA, CPU self time
    otherwise) goes to `path`; returns wall seconds, steps and, on CUDA, the seconds the device spent in kernels
    (busy / wall far below 1 means the steps are bound by the host (Python, launches, syncs), not the GPU) and
    where it idled (`kernel_gaps`, with kernels per step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.device.type == "cuda"
    steps = engine.num_steps
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        engine.generate(prompts, params, use_tqdm=False)
        synchronize(str(engine.runner.device))
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    Path(path).write_text(averages.table(sort_by=key, row_limit=40) + "\n")
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:15]
    result = {"wall_s": wall, "steps": engine.num_steps - steps,
              "top": [{"name": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count} for e in top]}
    if cuda:
        result["device_busy_s"] = sum(e.self_device_time_total for e in averages) / 1e6
        result["device_busy_fraction"] = result["device_busy_s"] / wall
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                   and e.time_range.end > e.time_range.start]
        result.update(kernel_gaps(kernels))
        result["kernels_per_step"] = result["kernels"] / max(1, result["steps"])
    return result


def run(args: argparse.Namespace) -> dict:
    if args.compare_skinny_matmul and not args.device.startswith("cuda"):
        raise SystemExit("--compare-skinny-matmul needs --device cuda: on a CPU the kernel runs under Triton's "
                         "interpreter, which says nothing about its speed")
    if (args.enable_pdl or args.compare_pdl) and not args.device.startswith("cuda"):
        raise SystemExit("--enable-pdl and --compare-pdl need --device cuda (a Hopper GPU): PDL is a GPU launch mode")
    threads = args.threads or (None if args.device.startswith("cuda") else 1)
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    bundle = load_model(args.preset, dtype=dtype, device=args.device, seed=args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.groups)]
    # Half the free GPU memory for the KV pool: the reference generator runs in the same process afterwards.
    config = EngineConfig(block_size=args.block_size, attention_backend=args.attention_backend,
                          enforce_eager=args.enforce_eager or not args.device.startswith("cuda"),
                          gpu_memory_utilization=0.5, num_scheduler_steps=args.num_scheduler_steps,
                          num_image_scheduler_steps=args.num_image_scheduler_steps, skinny_matmul=args.skinny_matmul,
                          enable_pdl=args.enable_pdl)
    engine = LLMEngine(bundle, config)
    reference = ReferenceGenerator(bundle)

    # Greedy agreement on a short run (also the warm-up of both sides: kernels, CUDA graphs, allocator).
    greedy = dict(n=2, text_temperature=0.0, image_temperature=0.0, cfg_weight=args.cfg, max_reasoning_tokens=8,
                  decode_images=False)
    ours = engine.generate(prompts[:2], SamplingParams(**greedy), use_tqdm=False)
    ref = reference.generate(prompts[:2], **greedy)
    hf_match = all(s.reasoning_ids == r.reasoning_ids and torch.equal(s.image_tokens.cpu(), r.image_tokens.cpu())
                   for g, rg in zip(ours, ref) for s, r in zip(g.samples, rg))

    r = args.reasoning_tokens
    settings = dict(n=args.n, cfg_weight=args.cfg, max_reasoning_tokens=r, min_reasoning_tokens=r,
                    decode_images=False, seed=args.seed)
    fused = engine.config.fuse_projections = engine.runner.fuse_projections  # the defaults for this device
    engine.config.disable_cascade_attn = engine.runner.disable_cascade_attn
    cascade_on = not engine.runner.disable_cascade_attn
    skinny = args.skinny_matmul

    def rollout(num_scheduler_steps: int, fuse: bool = fused, skinny_matmul: bool = skinny,
                image_steps: int | None = args.num_image_scheduler_steps,
                cascade: bool = cascade_on, pdl: bool = args.enable_pdl) -> tuple[float, list]:
        engine.scheduler.num_scheduler_steps = num_scheduler_steps  # the same engine, pool and weights
        engine.scheduler.num_image_scheduler_steps = image_steps
        cfg = engine.config
        switches = (fuse, skinny_matmul, not cascade, pdl)
        if (cfg.fuse_projections, cfg.skinny_matmul, cfg.disable_cascade_attn, cfg.enable_pdl) != switches:
            # read at the next bind, which drops the CUDA graphs: captured again by an untimed warm-up
            cfg.fuse_projections, cfg.skinny_matmul, cfg.disable_cascade_attn, cfg.enable_pdl = switches
            engine.generate(prompts[:1], SamplingParams(**greedy), use_tqdm=False)
        t, out = median_time(lambda: engine.generate(prompts, SamplingParams(**settings), use_tqdm=False),
                             device=args.device, warmup=0, repeats=1)
        assert all(len(s.reasoning_ids) == r + 1 for g in out for s in g.samples)
        return t, [(s.reasoning_ids, s.image_tokens.tolist()) for g in out for s in g.samples]

    def settings_side(c: dict) -> tuple:
        """`rollout`'s arguments for settings as `winning_settings` gives them."""
        return (c["num_scheduler_steps"], fused, c["skinny_matmul"], c["num_image_scheduler_steps"],
                c["cascade_attn"], c["enable_pdl"])

    # Optional sides, each the same engine with one setting the other way: name -> rollout's arguments.
    extra: dict[str, tuple] = {}
    if args.compare_skinny_matmul:
        extra["skinny"] = (args.num_scheduler_steps, fused, not skinny)
    if args.compare_num_scheduler_steps:
        extra["window"] = (args.compare_num_scheduler_steps, fused, skinny)
    if args.compare_num_image_scheduler_steps:
        extra["image_window"] = (args.num_scheduler_steps, fused, skinny, args.compare_num_image_scheduler_steps)
    if args.compare_cascade_attn:
        extra["cascade"] = (args.num_scheduler_steps, fused, skinny, args.num_image_scheduler_steps, not cascade_on)
    if args.compare_pdl:
        extra["pdl"] = (args.num_scheduler_steps, fused, skinny, args.num_image_scheduler_steps, True,
                        not args.enable_pdl)
    failed_sides = {}
    for name, side in [(None, (args.num_scheduler_steps, not fused, skinny)), *list(extra.items()),
                       (None, (1, fused, skinny)), (None, (args.num_scheduler_steps, fused, skinny))]:
        try:  # untimed: each side's first run at the timed shapes (see the module docstring)
            rollout(*side)
        except Exception as e:  # an optional side that cannot run here is left out, not the whole benchmark
            if name is None:
                raise
            failed_sides[name] = f"{type(e).__name__}: {e}"
            print(f"rollout: the {name!r} side failed and is left out: {failed_sides[name]}")
            del extra[name]
    reference.generate(prompts, **settings)
    compiled = ReferenceGenerator(bundle, compile=True) if args.hf_compile else None
    if compiled is not None:  # compilation and graph recording at the timed shapes, untimed: the second call
        for _ in range(2):  # compiles again, for the static caches the first one initialised
            compiled.generate(prompts, **settings)
    engine_times, single_times, other_times, hf_times, compiled_times = [], [], [], [], []
    extra_times: dict[str, list[float]] = {name: [] for name in extra}
    extra_tokens: dict[str, list] = {}
    other_match = compiled_match = skinny_match = cascade_match = pdl_match = True
    for _ in range(args.repeats):  # settings switch before the single-step side, never before the engine's
        t, other_tokens = rollout(args.num_scheduler_steps, fuse=not fused)
        other_times.append(t)
        for name, side in extra.items():
            t, extra_tokens[name] = rollout(*side)
            extra_times[name].append(t)
        t, single_tokens = rollout(1)
        single_times.append(t)
        engine.peak_used_blocks, steps = 0, engine.num_steps
        t, tokens = rollout(args.num_scheduler_steps)
        steps = engine.num_steps - steps
        engine_times.append(t)
        if tokens != single_tokens or any(tokens != extra_tokens[w] for w in ("window", "image_window") if w in extra):
            raise AssertionError("rollouts of the same seed with different decode windows sampled different tokens")
        other_match &= tokens == other_tokens
        skinny_match &= "skinny" not in extra or tokens == extra_tokens["skinny"]
        cascade_match &= "cascade" not in extra or tokens == extra_tokens["cascade"]
        pdl_match &= "pdl" not in extra or tokens == extra_tokens["pdl"]
        t, hf_out = median_time(lambda: reference.generate(prompts, **settings), device=args.device, warmup=0,
                                repeats=1)
        hf_times.append(t)
        if compiled is not None:
            t, compiled_out = median_time(lambda: compiled.generate(prompts, **settings), device=args.device,
                                          warmup=0, repeats=1)
            compiled_times.append(t)
            compiled_match &= _tokens(compiled_out) == _tokens(hf_out)
    t_engine, t_single, t_other, t_hf = (statistics.median(x) for x in (engine_times, single_times, other_times,
                                                                        hf_times))
    t_fused, t_unfused = (t_engine, t_other) if fused else (t_other, t_engine)

    prompt_lens = [len(ids) for ids in bundle.encode_prompts(prompts, r)]
    prompt_len = max(prompt_lens)  # transformers left-pads every row to the longest prompt
    tokens_per_group = args.n * (r + 1 + bundle.num_image_tokens)
    floor = bandwidth_floor(bundle, groups=args.groups, n=args.n, prompt_len=statistics.fmean(prompt_lens),
                            reasoning=r, bandwidth=copy_bandwidth(args.device))
    engine_ms_per_step = t_engine / steps * 1e3
    rows_hf = 2 * args.n * args.groups
    metrics = {
        "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "groups": args.groups, "n": args.n,
        "reasoning_tokens": r, "image_tokens": bundle.num_image_tokens, "cfg_weight": args.cfg,
        "attention_backend": engine.runner.backend.name, "cuda_graphs": engine.runner.use_cuda_graphs,
        "threads": torch.get_num_threads(), "hf_match": hf_match,
        "num_scheduler_steps": args.num_scheduler_steps, "num_image_scheduler_steps": args.num_image_scheduler_steps,
        "engine_s": t_engine, "hf_s": t_hf, "speedup_vs_hf": t_hf / t_engine,
        "engine_single_step_s": t_single, "multi_step_speedup": t_single / t_engine,
        "fuse_projections": fused, "skinny_matmul": skinny, "engine_other_fusion_s": t_other,
        "fused_projections_speedup": t_unfused / t_fused,
        "other_fusion_tokens_match": other_match,
        "engine_s_runs": engine_times, "engine_single_step_s_runs": single_times,
        "engine_other_fusion_s_runs": other_times, "hf_s_runs": hf_times,
        "engine_groups_per_s": args.groups / t_engine, "hf_groups_per_s": args.groups / t_hf,
        "engine_tokens_per_s": args.groups * tokens_per_group / t_engine,
        "hf_tokens_per_s": args.groups * tokens_per_group / t_hf,
        "kv_bytes_engine": engine.kv_bytes_used_peak,
        # The torch backend's contiguous decode workspace (CPU attention), on top of the paged pool.
        "attention_workspace_bytes": getattr(engine.runner.backend, "peak_workspace_bytes", 0),
        "kv_bytes_contiguous": rows_hf * (prompt_len + r + 1 + bundle.num_image_tokens) * floor["kv_bytes_per_token"],
        "engine_steps": steps, "engine_ms_per_step": engine_ms_per_step,
        "floor_ms_per_step": floor["floor_ms_per_step"],
        "floor_fraction": floor["floor_ms_per_step"] / engine_ms_per_step,
        "step_bytes_mean": floor["step_bytes_mean"], "floor_ms_per_step_per_row": floor["floor_ms_per_step_per_row"],
        "floor_fraction_per_row": floor["floor_ms_per_step_per_row"] / engine_ms_per_step,
        "step_bytes_mean_per_row": floor["step_bytes_mean_per_row"], "cascade_attn": engine.runner.cascade,
        "enable_pdl": args.enable_pdl, "preemptions": engine.scheduler.num_preemptions,
    }
    if failed_sides:
        metrics["failed_sides"] = failed_sides
    metrics["kv_ratio"] = metrics["kv_bytes_engine"] / metrics["kv_bytes_contiguous"]
    if compiled_times:
        t_compiled = statistics.median(compiled_times)
        metrics.update(hf_compiled_s=t_compiled, hf_compiled_s_runs=compiled_times,
                       speedup_vs_hf_compiled=t_compiled / t_engine, hf_compiled_tokens_match=compiled_match)
    if "skinny" in extra:
        t_skinny = statistics.median(extra_times["skinny"])
        t_on, t_off = (t_engine, t_skinny) if skinny else (t_skinny, t_engine)
        metrics.update(engine_other_skinny_s=t_skinny, engine_other_skinny_s_runs=extra_times["skinny"],
                       skinny_matmul_speedup=t_off / t_on, other_skinny_tokens_match=skinny_match)
    if "window" in extra:
        t_window = statistics.median(extra_times["window"])
        metrics.update(other_num_scheduler_steps=args.compare_num_scheduler_steps, engine_other_window_s=t_window,
                       engine_other_window_s_runs=extra_times["window"], window_speedup=t_engine / t_window)
    if "image_window" in extra:
        t_image_window = statistics.median(extra_times["image_window"])
        metrics.update(other_num_image_scheduler_steps=args.compare_num_image_scheduler_steps,
                       engine_other_image_window_s=t_image_window,
                       engine_other_image_window_s_runs=extra_times["image_window"],
                       image_window_speedup=t_engine / t_image_window)
    if "cascade" in extra:
        t_cascade = statistics.median(extra_times["cascade"])
        t_on, t_off = (t_engine, t_cascade) if cascade_on else (t_cascade, t_engine)
        metrics.update(engine_other_cascade_s=t_cascade, engine_other_cascade_s_runs=extra_times["cascade"],
                       cascade_attn_speedup=t_off / t_on, other_cascade_tokens_match=cascade_match)
    if "pdl" in extra:
        t_pdl = statistics.median(extra_times["pdl"])
        t_on, t_off = (t_engine, t_pdl) if args.enable_pdl else (t_pdl, t_engine)
        metrics.update(engine_other_pdl_s=t_pdl, engine_other_pdl_s_runs=extra_times["pdl"],
                       pdl_speedup=t_off / t_on, other_pdl_tokens_match=pdl_match)
    best_times = None
    if args.best_of_compared:
        candidates = best_candidates(metrics)
        runs: list[list[float]] = [engine_times] * len(candidates)
        matches = [True] * len(candidates)
        if candidates != [winning_settings(metrics, margin=math.inf)]:  # some setting switched: sides of their own
            for c in candidates:  # untimed: each one's first run at the timed shapes
                rollout(*settings_side(c))
            runs = [[] for _ in candidates]
            for _ in range(args.repeats):
                for i, c in enumerate(candidates):
                    t, best_tokens = rollout(*settings_side(c))
                    runs[i].append(t)
                    matches[i] &= best_tokens == tokens
        medians = [statistics.median(r) for r in runs]
        i = medians.index(min(medians))
        best, best_times, t_best = candidates[i], runs[i], medians[i]
        if len(candidates) > 1:
            metrics["best_candidates"] = [{"settings": c, "engine_s": t, "engine_s_runs": r}
                                          for c, t, r in zip(candidates, medians, runs)]
            if i != len(candidates) - 1:  # the engine as the best side left it, for the profile
                rollout(*settings_side(best))
        print(f"rollout: best_settings {best}")
        metrics.update(best_settings=best, engine_best_s=t_best, engine_best_s_runs=best_times,
                       speedup_vs_hf_best=t_hf / t_best, best_tokens_match=matches[i],
                       engine_best_ms_per_step=t_best / steps * 1e3,
                       floor_fraction_best=floor["floor_ms_per_step"] / (t_best / steps * 1e3))
    if args.profile:  # of the engine as the last side left it: the best settings' with --best-of-compared
        metrics["profile"] = profile_rollout(engine, prompts, SamplingParams(**settings), args.profile)

    def engine_row(side: str, t: float) -> dict:
        return {"side": side, "seconds": t, "groups_per_s": args.groups / t,
                "tokens_per_s": args.groups * tokens_per_group / t, "kv_mib": metrics["kv_bytes_engine"] / 2**20,
                "ms_per_step": t / steps * 1e3, "speedup": t_hf / t, "hf_match": hf_match}

    rows = [
        engine_row("engine", t_engine), engine_row("engine, single-step", t_single),
        engine_row(f"engine, projections {'unfused' if fused else 'fused'}", t_other),
        *([engine_row(f"engine, skinny matmul {'off' if skinny else 'on'}", t_skinny)] if "skinny" in extra else []),
        *([engine_row(f"engine, {args.compare_num_scheduler_steps}-step windows", t_window)]
          if "window" in extra else []),
        *([engine_row(f"engine, {args.compare_num_image_scheduler_steps}-step image windows", t_image_window)]
          if "image_window" in extra else []),
        *([engine_row(f"engine, cascade attention {'off' if cascade_on else 'on'}", t_cascade)]
          if "cascade" in extra else []),
        *([engine_row(f"engine, PDL {'off' if args.enable_pdl else 'on'}", t_pdl)] if "pdl" in extra else []),
        *([engine_row("engine, best of the compared settings", t_best)] if best_times is not None else []),
        {"side": "transformers", "seconds": t_hf, "groups_per_s": metrics["hf_groups_per_s"],
         "tokens_per_s": metrics["hf_tokens_per_s"], "kv_mib": metrics["kv_bytes_contiguous"] / 2**20,
         "ms_per_step": t_hf / (r + bundle.num_image_tokens) * 1e3, "speedup": 1.0, "hf_match": hf_match},
    ]
    if compiled_times:
        rows.append({"side": "transformers, static cache + torch.compile", "seconds": t_compiled,
                     "groups_per_s": args.groups / t_compiled,
                     "tokens_per_s": args.groups * tokens_per_group / t_compiled,
                     "kv_mib": metrics["kv_bytes_contiguous"] / 2**20,
                     "ms_per_step": t_compiled / (r + bundle.num_image_tokens) * 1e3, "speedup": t_hf / t_compiled,
                     "hf_match": compiled_match})  # its sampled tokens == the eager reference's, same seeds
    print_table("rollout: KV memory and the decode-step bandwidth floor", [{
        k: metrics[k] for k in ("threads", "kv_bytes_engine", "attention_workspace_bytes", "kv_bytes_contiguous",
                                "kv_ratio", "engine_steps", "multi_step_speedup", "fused_projections_speedup",
                                "engine_ms_per_step", "floor_ms_per_step", "floor_fraction", "preemptions")}])
    return write_result("rollout", args, metrics, rows)
