"""`python -m bench rollout`: the bandwidth floor against a hand count, and the result's figures against their
definitions on a tiny run (its speed is not asserted: speed claims come from the benchmark's JSON only)."""
from __future__ import annotations

import argparse
import collections
import json
import statistics

import pytest

from bench import rollout
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from gotr1.model import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_bandwidth_floor_matches_a_hand_count(tiny):
    """Tiny preset, fp32: hidden 64, 2 layers, 4 query / 2 KV heads of 16 (GQA), MLP 128, text vocabulary 576 (head
    tied to the embeddings), image head 64 -> 64 -> 1024 and aligner 8 -> 64 -> 64, both with biases."""
    layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v, o, gate/up/down, two norms
    stack = 4 * (2 * layer + 64)  # bytes: layers + final norm
    text_head = 4 * 576 * 64
    image_head = 4 * ((64 * 64 + 64) + (64 * 1024 + 1024) + (8 * 64 + 64) + (64 * 64 + 64))
    kv = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads (not query heads), head dim, fp32
    groups, n, prompt, r, image = 2, 8, 20.5, 300, 576
    rows = groups * n
    floor = rollout.bandwidth_floor(tiny, groups=groups, n=n, prompt_len=prompt, reasoning=r, bandwidth=2e9)
    assert floor["kv_bytes_per_token"] == kv
    # every row's whole context
    text = stack + text_head + rows * (prompt + r / 2) * kv
    cfg = stack + image_head + 2 * rows * (prompt + r + 1 + image / 2) * kv  # conditional + unconditional rows
    # each prompt once for its group's rows; the pad prefix (prompt + chain) once for every unconditional row
    text_shared = stack + text_head + (groups * prompt + rows * r / 2) * kv
    cfg_shared = stack + image_head + (groups * prompt + rows * (r + 1 + image / 2)
                                       + (prompt + r) + rows * (1 + image / 2)) * kv
    for suffix, t, c in (("", text_shared, cfg_shared), ("_per_row", text, cfg)):
        mean = ((r + 1) * t + image * c) / (r + 1 + image)
        assert floor[f"step_bytes_text{suffix}"] == pytest.approx(t, rel=1e-12)
        assert floor[f"step_bytes_image{suffix}"] == pytest.approx(c, rel=1e-12)
        assert floor[f"step_bytes_mean{suffix}"] == pytest.approx(mean, rel=1e-12)
        assert floor[f"floor_ms_per_step{suffix}"] == pytest.approx(mean / 2e9 * 1e3, rel=1e-12)
    assert floor["step_bytes_mean"] < floor["step_bytes_mean_per_row"]


def test_rollout_result_figures(tiny, tmp_path):
    """Two prompts of different lengths: the floor counts each row's own prompt, the contiguous cache pads to the
    longest; ratios, rates and the promised keys are what the JSON says they are."""
    path = tmp_path / "rollout.json"
    rollout.run(_args(["--groups", "2", "--n", "1", "--reasoning-tokens", "2", "--repeats", "1", "--json", str(path)]))
    result = json.loads(path.read_text())
    m, env = result["metrics"], result["env"]
    for key in ("device", "torch", "transformers", "git_commit"):
        assert env[key]
    assert m["hf_match"] is True and m["other_fusion_tokens_match"] is True
    assert m["skinny_matmul"] is False and "skinny_matmul_speedup" not in m  # a GPU comparison, not asked for
    assert [row["side"] for row in result["rows"]] == ["engine", "engine, single-step", "engine, projections fused",
                                                       "transformers"]
    assert m["speedup_vs_hf"] == pytest.approx(m["hf_s"] / m["engine_s"])
    assert m["engine_s"] == statistics.median(m["engine_s_runs"]) and m["hf_s"] == statistics.median(m["hf_s_runs"])
    assert m["engine_groups_per_s"] == pytest.approx(2 / m["engine_s"])
    assert m["hf_groups_per_s"] == pytest.approx(2 / m["hf_s"])
    assert m["engine_tokens_per_s"] == pytest.approx(2 * 1 * (2 + 1 + 576) / m["engine_s"])
    lens = [len(ids) for ids in tiny.encode_prompts(list(rollout.PROMPTS[:2]), 2)]
    assert lens[0] != lens[1]
    kv = rollout.bandwidth_floor(tiny, groups=1, n=1, prompt_len=0, reasoning=0, bandwidth=1.0)["kv_bytes_per_token"]
    assert m["kv_bytes_contiguous"] == 2 * 2 * (max(lens) + 2 + 1 + 576) * kv
    assert 0 < m["kv_bytes_engine"] and m["kv_ratio"] == m["kv_bytes_engine"] / m["kv_bytes_contiguous"]
    floor = rollout.bandwidth_floor(tiny, groups=2, n=1, prompt_len=statistics.fmean(lens), reasoning=2,
                                    bandwidth=1.0)
    for key in ("step_bytes_mean", "step_bytes_mean_per_row"):
        assert m[key] == pytest.approx(floor[key], rel=1e-12)
    assert m["floor_fraction_per_row"] == pytest.approx(m["floor_ms_per_step_per_row"] / m["engine_ms_per_step"])
    assert m["cascade_attn"] is True and "cascade_attn_speedup" not in m


def test_the_window_and_cascade_comparisons_are_more_sides(tmp_path, monkeypatch):
    """`--compare-num-scheduler-steps 4 --compare-num-image-scheduler-steps 8 --compare-cascade-attn`: three more
    engine sides, timed every repeat, their windows really that long (the scheduler's settings are read at each
    rollout; the default runs the image phase in one window), the cascade side's steps really unshared, the same
    tokens, and their speedups the ratios of the medians."""
    longest = collections.defaultdict(int)  # (window, image window) -> longest window scheduled
    schedule, prepare = Scheduler.schedule, ModelRunner._prepare
    shared_runs = collections.Counter()  # (cascade on, shared runs built) -> decode windows

    def spy(scheduler):
        batch = schedule(scheduler)
        key = scheduler.num_scheduler_steps, scheduler.num_image_scheduler_steps
        longest[key] = max(longest[key], batch.num_steps)
        return batch

    def prepare_spy(runner, batch, first):
        steps = prepare(runner, batch, first)
        if not batch.is_prefill and first == 0:
            shared_runs[runner.cascade, steps[0].meta.shared is not None] += 1
        return steps

    monkeypatch.setattr(Scheduler, "schedule", spy)
    monkeypatch.setattr(ModelRunner, "_prepare", prepare_spy)
    path = tmp_path / "rollout.json"
    rollout.run(_args(["--groups", "1", "--n", "2", "--reasoning-tokens", "2", "--repeats", "2",
                       "--compare-num-scheduler-steps", "4", "--compare-num-image-scheduler-steps", "8",
                       "--compare-cascade-attn", "--json", str(path)]))
    result = json.loads(path.read_text())
    m = result["metrics"]
    assert m["other_num_scheduler_steps"] == 4 and len(m["engine_other_window_s_runs"]) == 2
    assert m["engine_other_window_s"] == statistics.median(m["engine_other_window_s_runs"])
    assert m["window_speedup"] == pytest.approx(m["engine_s"] / m["engine_other_window_s"])
    assert m["other_num_image_scheduler_steps"] == 8 and len(m["engine_other_image_window_s_runs"]) == 2
    assert m["engine_other_image_window_s"] == statistics.median(m["engine_other_image_window_s_runs"])
    assert m["image_window_speedup"] == pytest.approx(m["engine_s"] / m["engine_other_image_window_s"])
    assert m["num_image_scheduler_steps"] is None
    assert len(m["engine_other_cascade_s_runs"]) == 2 and m["other_cascade_tokens_match"] is True
    assert m["cascade_attn_speedup"] == pytest.approx(m["engine_other_cascade_s"] / m["engine_s"])
    assert set(shared_runs) == {(True, True), (True, False), (False, False)}  # the torch backend's workspace
    sides = [row["side"] for row in result["rows"]]  # is gathered with the runs, then reused
    assert sides[3:6] == ["engine, 4-step windows", "engine, 8-step image windows", "engine, cascade attention off"]
    # the image phase (576 tokens, the first sampled by the step that feeds BOI) in one window, or 8-step ones
    assert longest == {(16, None): 576, (4, None): 576, (16, 8): 8, (1, None): 1}


def test_the_gpu_only_comparisons_are_refused_on_a_cpu():
    """Under Triton's interpreter the kernel's time says nothing about a GPU's, and PDL is a GPU launch mode:
    refused before any model loads."""
    with pytest.raises(SystemExit, match="--compare-skinny-matmul needs --device cuda"):
        rollout.run(_args(["--compare-skinny-matmul"]))
    for flag in ("--compare-pdl", "--enable-pdl"):
        with pytest.raises(SystemExit, match="--enable-pdl and --compare-pdl need --device cuda"):
            rollout.run(_args([flag]))


def test_an_optional_side_that_fails_is_left_out(tmp_path, monkeypatch):
    """A comparison side whose first run fails (here: cascade attention off refused at bind, as `enable_pdl` is on
    a GPU without it) is named in `failed_sides` and left out of the timings; the other sides are measured."""
    bind = ModelRunner.bind

    def refusing_bind(runner, model):
        if runner.config.disable_cascade_attn:
            raise RuntimeError("not on this machine")
        bind(runner, model)

    monkeypatch.setattr(ModelRunner, "bind", refusing_bind)
    path = tmp_path / "rollout.json"
    rollout.run(_args(["--groups", "1", "--n", "2", "--reasoning-tokens", "2", "--repeats", "1",
                       "--compare-cascade-attn", "--compare-num-scheduler-steps", "4", "--json", str(path)]))
    result = json.loads(path.read_text())
    m = result["metrics"]
    assert m["failed_sides"] == {"cascade": "RuntimeError: not on this machine"}
    assert "cascade_attn_speedup" not in m and m["cascade_attn"] is True
    assert m["hf_match"] is True and "window_speedup" in m and m["speedup_vs_hf"] > 0
    assert "engine, cascade attention off" not in [row["side"] for row in result["rows"]]


def test_winning_settings_switch_what_was_faster_by_more_than_the_margin():
    """Each switch: the time off over the time on (> 1: on wins); windows: the engine's time over the other's
    (> 1: the other's length wins); within the margin, or not compared, the engine's own setting stays."""
    engine = dict(num_scheduler_steps=16, num_image_scheduler_steps=None, skinny_matmul=False, cascade_attn=True,
                  enable_pdl=False)
    assert rollout.winning_settings(engine) == engine
    measured = dict(engine, skinny_matmul_speedup=1.05, cascade_attn_speedup=0.9, pdl_speedup=1.011,
                    window_speedup=1.02, other_num_scheduler_steps=64, image_window_speedup=0.95,
                    other_num_image_scheduler_steps=16)
    assert rollout.winning_settings(measured) == dict(num_scheduler_steps=64, num_image_scheduler_steps=None,
                                                      skinny_matmul=True, cascade_attn=False, enable_pdl=True)
    edge = dict(measured, skinny_matmul=True, skinny_matmul_speedup=0.991, pdl_speedup=1.009, window_speedup=1.009,
                cascade_attn_speedup=1.2)  # skinny on and slightly better off: stays on
    assert rollout.winning_settings(edge) == dict(engine, skinny_matmul=True)
    assert rollout.winning_settings(measured, margin=0.1) == engine


def test_a_switched_skinny_matmul_is_timed_with_pdl_both_ways():
    """PDL's own comparison ran with the other matmuls: when the best switches `skinny_matmul`, both PDL settings
    are candidates; otherwise (or when PDL was not compared) the winners alone."""
    engine = dict(num_scheduler_steps=16, num_image_scheduler_steps=None, skinny_matmul=False, cascade_attn=True,
                  enable_pdl=False)
    best = dict(engine, skinny_matmul=True)
    assert rollout.best_candidates(dict(engine, skinny_matmul_speedup=1.1, pdl_speedup=1.0)) == [
        best, dict(best, enable_pdl=True)]
    assert rollout.best_candidates(dict(engine, skinny_matmul_speedup=1.1, pdl_speedup=1.05)) == [
        dict(best, enable_pdl=True), best]
    assert rollout.best_candidates(dict(engine, skinny_matmul_speedup=1.1)) == [best]
    assert rollout.best_candidates(dict(engine, skinny_matmul_speedup=1.001, pdl_speedup=1.0)) == [engine]


def fake_times(monkeypatch, engine_time) -> None:
    """`bench rollout`'s timings made up: `engine_time(engine)` seconds for an engine rollout (by the settings
    the engine ran with), 10 s for transformers'; the rollouts themselves still run."""
    engines = []
    generate = rollout.LLMEngine.generate

    def spy(engine, *a, **k):
        engines.append(engine)
        return generate(engine, *a, **k)

    def fake_time(fn, *, device, warmup, repeats):
        engines.clear()
        out = fn()
        return (engine_time(engines[-1]) if engines else 10.0), out

    monkeypatch.setattr(rollout.LLMEngine, "generate", spy)
    monkeypatch.setattr(rollout, "median_time", fake_time)


@pytest.mark.parametrize("window_factor", [0.9, 1.0])
def test_the_best_of_the_compared_settings_is_one_more_side(tmp_path, monkeypatch, window_factor):
    """With fake times (4-step windows 10% faster, or no faster; cascade attention off 0.5% slower, inside the
    margin): the best side runs with the winners only when some setting won, timed every repeat, and its ratio is
    transformers' median over its median; otherwise it is the engine side itself."""
    fake_times(monkeypatch, lambda e: (window_factor if e.scheduler.num_scheduler_steps == 4 else 1.0)
               * (1.005 if e.config.disable_cascade_attn else 1.0))
    path = tmp_path / "rollout.json"
    rollout.run(_args(["--preset", "shapes", "--groups", "1", "--n", "1", "--reasoning-tokens", "2", "--repeats", "2",
                       "--compare-num-scheduler-steps", "4", "--compare-cascade-attn", "--best-of-compared",
                       "--json", str(path)]))  # the shapes preset: 64 image tokens, the times are fake
    result = json.loads(path.read_text())
    m, sides = result["metrics"], [row["side"] for row in result["rows"]]
    won = window_factor < 1
    assert m["best_settings"] == dict(num_scheduler_steps=4 if won else 16, num_image_scheduler_steps=None,
                                      skinny_matmul=False, cascade_attn=True, enable_pdl=False)
    assert m["engine_best_s_runs"] == ([0.9, 0.9] if won else m["engine_s_runs"])
    assert m["speedup_vs_hf_best"] == pytest.approx(10.0 / (0.9 if won else 1.0))
    assert m["best_tokens_match"] is True
    assert ("engine, best of the compared settings" in sides) and sides[-1] == "transformers"


@pytest.mark.parametrize("faster_first", [True, False])
def test_of_several_best_candidates_the_faster_is_timed_and_profiled(tmp_path, monkeypatch, faster_first):
    """Two candidates (here: the winners with cascade attention on and off; on a GPU, PDL both ways), timed in
    turns every repeat: the faster median is `best_settings`, each candidate's times are in `best_candidates`,
    and the profile runs with the best one's settings even when the other ran last."""
    profiled = []
    fake_times(monkeypatch, lambda e: (0.8 if e.scheduler.num_scheduler_steps == 4 else 1.0)
               * (0.9 if e.config.disable_cascade_attn else 1.0))

    def candidates(metrics):
        best = rollout.winning_settings(metrics)
        both = [dict(best, cascade_attn=False), best]  # the faster first: the slower runs last
        return both if faster_first else both[::-1]

    monkeypatch.setattr(rollout, "best_candidates", candidates)
    monkeypatch.setattr(rollout, "profile_rollout", lambda engine, *a: profiled.append(
        (engine.scheduler.num_scheduler_steps, engine.config.disable_cascade_attn)) or {})
    path = tmp_path / "rollout.json"
    rollout.run(_args(["--preset", "shapes", "--groups", "1", "--n", "1", "--reasoning-tokens", "2", "--repeats", "2",
                       "--compare-num-scheduler-steps", "4", "--best-of-compared", "--profile", "unused",
                       "--json", str(path)]))
    m = json.loads(path.read_text())["metrics"]
    best = dict(num_scheduler_steps=4, num_image_scheduler_steps=None, skinny_matmul=False, cascade_attn=False,
                enable_pdl=False)
    assert m["best_settings"] == best and m["engine_best_s_runs"] == pytest.approx([0.72, 0.72])
    listed = [(best, pytest.approx([0.72, 0.72])), (dict(best, cascade_attn=True), [0.8, 0.8])]
    listed = listed if faster_first else listed[::-1]
    assert [(c["settings"], c["engine_s_runs"]) for c in m["best_candidates"]] == listed
    assert m["speedup_vs_hf_best"] == pytest.approx(10.0 / 0.72)
    assert profiled == [(4, True)]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    rollout.add_args(parser)
    return parser.parse_args(argv)


def test_kernel_gaps_split_launch_gaps_from_host_waits():
    """Overlapping and touching kernels leave no gap; the rest is short (<= 10 us) or long, counted by the union."""
    kernels = [(0.0, 5.0), (3.0, 8.0), (8.0, 9.0), (10.0, 20.0), (30.0, 31.0), (131.0, 140.0), (135.0, 136.0)]
    gaps = rollout.kernel_gaps(kernels)
    assert gaps == {"kernels": 7, "gap_short_s": pytest.approx(11e-6), "gaps_short": 2,
                    "gap_long_s": pytest.approx(100e-6), "gaps_long": 1}
    assert rollout.kernel_gaps(list(reversed(kernels))) == gaps  # order of the profiler's events does not matter
    assert rollout.kernel_gaps([])["kernels"] == 0
