"""The CPU fast paths: the torch attention backend's C++ decode step (engine/attention.py) against the paged
reference, the torch sampling path's C++ Gumbel-max (kernels/cfg_sampling.py) against its torch formulas, bit for
bit, and `cpu_library`, which builds both. Without a C++ compiler the kernel tests skip (the torch paths run)."""
from __future__ import annotations

import logging
import math
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.attention as attention
import kernels.cfg_sampling as cfg_sampling
from engine.attention import AttentionMetadata, TorchBackend
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from gotr1.model import build_preset
from kernels.cfg_sampling import SampleOutput, cfg_sample_torch
from kernels.native import cpu_library
from kernels.paged_attention import paged_decode_attention_reference, shared_prefixes

# Every `torch.empty` the code under test asks for comes back poisoned (conftest): unwritten outputs show.
pytestmark = pytest.mark.usefixtures("poison")


def decode_library():
    lib = attention._decode_library()
    if lib is None:
        pytest.skip("no C++ compiler: the decode kernel cannot be built")
    return lib


def sample_library():
    lib = cfg_sampling._sample_cpu_library()
    if lib is None:
        pytest.skip("no C++ compiler: the sampling kernel cannot be built")
    return lib


# ---------------------------------------------------------------------------------------------------- attention


def run_decode(monkeypatch, *, native: bool, runs: list[tuple[int, list[int]]], group: int, dim: int,
               kv_heads: int = 2, layers: int = 2, block_size: int = 4, steps: int = 40, drop_at: int | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> TorchBackend:
    """Decode `steps` steps of rows built from `runs` (each: blocks shared by its rows, their cached lengths) through
    a `TorchBackend`, and check every layer's output against `paged_decode_attention_reference` on the paged cache
    (to fp32 rounding; a bf16 model's outputs to one ulp).

    Every pool slot that no row holds is NaN, so a read outside a row's context shows. A capacity step of 16 makes
    contexts outgrow the workspace (it grows), and `drop_at` drops the last row at that step (a re-gather)."""
    if native:
        decode_library()
    else:
        monkeypatch.setattr(attention, "_decode_library", lambda: None)
    monkeypatch.setattr(TorchBackend, "_CAPACITY_STEP", 16)
    g = torch.Generator().manual_seed(seed)
    held = [n for _, lens in runs for n in lens]
    need = [-(-(n + steps + 1) // block_size) for n in held]
    tables, next_block = [], 0
    for shared, lens in runs:
        prefix = list(range(next_block, next_block + shared))
        next_block += shared
        for _ in lens:
            own = need[len(tables)] - shared
            tables.append(prefix + list(range(next_block, next_block + own)))
            next_block += own
    kv_cache = torch.full((2, layers, next_block, block_size, kv_heads, dim), math.nan, dtype=dtype)
    for table, n in zip(tables, held):
        for p in range(n):
            kv_cache[:, :, table[p // block_size], p % block_size] = torch.randn(2, layers, kv_heads, dim, generator=g)
    atol = 1e-6 if dtype == torch.float32 else 2**-7  # one bf16 ulp below 2
    backend, scale = TorchBackend(), dim**-0.5
    rows = list(range(len(held)))
    for step in range(steps):
        if step == drop_at:
            rows = rows[:-1]
        lens = [held[r] + 1 for r in rows]
        width = max(len(tables[r]) for r in rows)
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=torch.tensor([tables[r][held[r] // block_size] * block_size
                                                         + held[r] % block_size for r in rows]),
            context_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([tables[r] + [0] * (width - len(tables[r])) for r in rows], dtype=torch.int32),
            seq_ids=tuple(rows), host_context_lens=lens,
            shared=torch.tensor(shared_prefixes([tables[r] for r in rows], [held[r] for r in rows], block_size),
                                dtype=torch.int32))
        backend.begin_step(kv_cache, meta)
        for layer in range(layers):
            qk = torch.randn(len(rows), (group + 1) * kv_heads, dim, generator=g).to(dtype)  # q, k: views, as in
            q, k = qk[:, :group * kv_heads], qk[:, group * kv_heads:]  # the runner
            v = torch.randn(len(rows), kv_heads, dim, generator=g).to(dtype)
            k_cache, v_cache = kv_cache[0, layer], kv_cache[1, layer]
            out = backend.forward(layer, q, k, v, k_cache, v_cache, meta, scale)
            ref = paged_decode_attention_reference(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                   scale=scale)
            torch.testing.assert_close(out, ref, rtol=0, atol=atol)
        for r in rows:
            held[r] += 1
    assert backend._tiled == native
    return backend


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("group,dim,dtype", [(1, 16, torch.float32), (2, 16, torch.float32), (3, 32, torch.float32),
                                             (5, 16, torch.float32), (2, 16, torch.bfloat16)])
def test_decode_equals_paged_reference(monkeypatch, native, group, dim, dtype):
    """Three runs of rows sharing prompt blocks (9, 5 and 0 blocks of 4), lengths that differ inside a run; a
    bf16 model (its paged cache stored by torch, the workspace fp32)."""
    runs = [(9, [40, 45, 38]), (5, [20, 33]), (0, [7])]
    backend = run_decode(monkeypatch, native=native, runs=runs, group=group, dim=dim, drop_at=25, dtype=dtype)
    if native:  # rows 1 and 2 read their first 32 positions (2 tiles) through row 0, row 4 its 16 through row 3
        assert backend._shared.tolist() == [[0, 2], [0, 2], [0, 2], [3, 1], [3, 1]]


@settings(max_examples=12)
@given(runs=st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(0, 30), min_size=1, max_size=3)),
                     min_size=1, max_size=3),
       group=st.integers(1, 6), block_size=st.sampled_from([4, 16]), seed=st.integers(0, 99))
def test_decode_kernel_property(runs, group, block_size, seed):
    """Random run layouts: every row holds at least its run's shared blocks."""
    runs = [(shared, [shared * block_size + extra for extra in lens]) for shared, lens in runs]
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_decode(monkeypatch, native=True, runs=runs, group=group, dim=16, block_size=block_size, steps=20,
                   seed=seed)


def test_decode_kernel_rejects_a_slot_outside_the_pool():
    decode_library()
    kv_cache = torch.zeros(2, 1, 4, 4, 1, 16)
    backend = TorchBackend()
    meta = AttentionMetadata(is_prefill=False, slot_mapping=torch.tensor([2]), context_lens=torch.tensor(
        [3], dtype=torch.int32), block_tables=torch.tensor([[0]], dtype=torch.int32), seq_ids=(0,),
        host_context_lens=[3])
    backend.begin_step(kv_cache, meta)
    meta.slot_mapping = torch.tensor([16])
    q = torch.randn(1, 1, 16)
    with pytest.raises(IndexError, match="outside the KV pool"):
        backend.forward(0, q, q, q, kv_cache[0, 0], kv_cache[1, 0], meta, 0.25)
    assert not kv_cache.any()  # nothing written


# ---------------------------------------------------------------------------------------------------- sampling


def test_cpu_gumbel_equals_torch_on_every_uniform():
    """The C++ Gumbel of each of the 2^23 uniforms equals `_gumbel`'s (torch's float64 logs), and rises with the
    uniform (what the kernel's bounds rely on, with an ulp of slack)."""
    lib = sample_library()
    bits = torch.arange(2**23, dtype=torch.int32)
    out = torch.full((2**23,), math.nan)
    lib.gotr1_gumbel(bits.data_ptr(), bits.numel(), out.data_ptr())
    ref = cfg_sampling._gumbel((bits.double() * 2 + 1) * 2.0**-24)
    assert torch.equal(out, ref)
    assert bool((ref[1:] >= ref[:-1]).all())


def torch_tokens(s, keep, greedy, seeds, counters):
    keys = s.clone()
    for r, g in enumerate(greedy):
        if not g:
            row_keep = None if keep is None else keep[r:r + 1]
            keys[r] = cfg_sampling._sampling_keys(s[r:r + 1], row_keep, seeds[r:r + 1], counters[r:r + 1])[0]
    return keys.argmax(-1)


@settings(max_examples=40)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 300), scale=st.sampled_from([0.01, 1.0, 30.0]),
       ties=st.booleans(), masked=st.booleans(), special=st.sampled_from(["none", "-inf", "+inf", "nan", "all -inf"]),
       seed=st.integers(0, 2**16))
def test_cpu_sampler_tokens_equal_torch(rows, vocab, scale, ties, masked, special, seed):
    """Tokens of the C++ Gumbel-max == argmax of the torch keys: ties (integer logits), top-k/top-p style masks,
    infinities, NaN, greedy rows, seeds and counters over 64 bits."""
    lib = sample_library()
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-2, 3, (rows, vocab), generator=g).float() if ties else torch.randn(rows, vocab, generator=g)
    s = s * scale
    if special == "all -inf":
        s[0] = -math.inf
    elif special != "none":
        s[torch.rand(rows, vocab, generator=g) < 0.1] = float(special)
    keep = None
    if masked:
        keep = torch.rand(rows, vocab, generator=g) < 0.4
        keep[:, 0] = True
    greedy = (torch.rand(rows, generator=g) < 0.3).tolist()
    seeds = torch.randint(-2**63, 2**63 - 1, (rows,), generator=g)
    counters = torch.randint(0, 2**62, (rows,), generator=g)
    tokens = cfg_sampling._sample_cpu(lib, s, keep, greedy, seeds, counters)
    assert torch.equal(tokens, torch_tokens(s, keep, greedy, seeds, counters))


@pytest.mark.parametrize("spread", [1e-2, 1e-4, 1e-6])
def test_cpu_sampler_near_ties(spread):
    """Logits that cancel each token's own Gumbel up to a small spread: every key is near the maximum, so the
    kernel's per-bin bounds decide which tokens it evaluates; a bound that misses a winner shows here."""
    lib = sample_library()
    g = torch.Generator().manual_seed(int(1 / spread))
    rows, vocab = 64, 1024
    seeds = torch.randint(-2**62, 2**62, (rows,), generator=g)
    counters = torch.randint(0, 2**40, (rows,), generator=g)
    gumbel = cfg_sampling._sampling_keys(torch.zeros(rows, vocab), None, seeds, counters)
    s = spread * torch.randn(rows, vocab, generator=g) - gumbel
    greedy = [False] * rows
    tokens = cfg_sampling._sample_cpu(lib, s, None, greedy, seeds, counters)
    assert torch.equal(tokens, torch_tokens(s, None, greedy, seeds, counters))


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("filters", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_sample_torch_equals_its_torch_only_path(monkeypatch, paired, filters, dtype):
    """`cfg_sample_torch` with the C++ kernels == without them, all three outputs bit for bit (greedy rows mixed
    in, a strided logits view, -inf in both rows of a pair)."""
    sample_library()
    g = torch.Generator().manual_seed(3)
    rows, vocab = 12, 1001
    wide = (torch.randn(2, rows, vocab + 3, generator=g) * 3).to(dtype)
    wide[:, :, 5::7] = -math.inf
    cond, uncond = wide[0, :, :vocab], (wide[1, :, :vocab] if paired else None)
    params = dict(cfg_weight=torch.rand(rows, generator=g) * 6,
                  temperature=torch.tensor([0.0, 1.0, 0.7, 1.3] * 3),
                  top_k=torch.tensor([0, 5, 50, 0] * 3) if filters else torch.zeros(rows, dtype=torch.int64),
                  top_p=torch.tensor([1.0, 0.9, 0.5] * 4) if filters else torch.ones(rows),
                  seeds=torch.randint(-2**62, 2**62, (rows,), generator=g),
                  counters=torch.randint(0, 2**40, (rows,), generator=g))
    fast = cfg_sample_torch(cond, uncond, **params)
    monkeypatch.setattr(cfg_sampling, "_sample_cpu_library", lambda: None)
    plain = cfg_sample_torch(cond, uncond, **params)
    for a, b in zip((fast.tokens, fast.logprobs, fast.mixed_logprobs), (plain.tokens, plain.logprobs,
                                                                          plain.mixed_logprobs)):
        assert torch.equal(a, b)
    assert isinstance(fast, SampleOutput)


# ---------------------------------------------------------------------------------------------------- building


def test_cpu_library_builds_once_and_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("GOTR1_CACHE", str(tmp_path))
    source = 'extern "C" int gotr1_test_answer() { return 42; }\n'
    lib = cpu_library.__wrapped__("answer", source)
    if lib is None:
        pytest.skip("no C++ compiler")
    assert lib.gotr1_test_answer() == 42
    [built] = (tmp_path / "cpu_kernels").iterdir()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cpu_library.__wrapped__("answer", source).gotr1_test_answer() == 42
    assert list((tmp_path / "cpu_kernels").iterdir()) == [built]


def test_cpu_library_failures_fall_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GOTR1_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kernels.cfg_sampling"):
        assert cpu_library.__wrapped__("broken", "this is not C++") is None
        monkeypatch.setenv("CXX", "/nonexistent/c++")
        assert cpu_library.__wrapped__("missing", 'extern "C" int f() { return 1; }') is None
    assert "build or load failed" in caplog.text and "no C++ compiler" in caplog.text


# ---------------------------------------------------------------------------------------------------- engine


def test_rollouts_equal_with_and_without_the_cpu_kernels(monkeypatch):
    """A CFG rollout of the tiny preset (head dim 16: the C++ decode step runs) equals the same rollout on the
    torch paths: greedy and sampled tokens, log-probs to float rounding."""
    decode_library()
    sample_library()
    tiny = build_preset("tiny", image_size=64)
    params = [SamplingParams(n=3, text_temperature=0, image_temperature=0, max_reasoning_tokens=6,
                             decode_images=False),
              SamplingParams(n=3, max_reasoning_tokens=10, min_reasoning_tokens=4, seed=4, decode_images=False)]
    prompts = ["a red cat on a blue table", "two green squares"]

    def rollout():
        engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=400, block_size=4))
        groups = engine.generate(prompts, params, use_tqdm=False)
        assert engine.runner.backend._tiled == (attention._decode_library() is not None)
        return [s for g in groups for s in g.samples]

    fast = rollout()
    monkeypatch.setattr(attention, "_decode_library", lambda: None)
    monkeypatch.setattr(cfg_sampling, "_sample_cpu_library", lambda: None)
    plain = rollout()
    for a, b in zip(fast, plain):
        assert a.reasoning_ids == b.reasoning_ids and a.image_tokens.tolist() == b.image_tokens.tolist()
        for x, y in ((a.text_logprobs, b.text_logprobs), (a.image_logprobs, b.image_logprobs),
                     (a.image_mixed_logprobs, b.image_mixed_logprobs)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_scheduler_steps", [1, 16])
def test_workspace_outgrowing_its_bound_falls_back_to_the_paged_cache(monkeypatch, num_scheduler_steps):
    """A row's context crosses the workspace's capacity (256 positions) mid-rollout and the larger workspace would
    exceed its bound (the pool itself here): the steps from then on read the paged cache, which the metadata must
    then carry. Same tokens, same log-probs to float rounding, as with a workspace that may grow."""
    tiny = build_preset("tiny")  # 576 image tokens: contexts reach 600
    params = SamplingParams(n=1, cfg_weight=1.0, max_reasoning_tokens=8, seed=0, decode_images=False)

    def rollout():
        engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=40, block_size=16, num_scheduler_steps=num_scheduler_steps))
        [group] = engine.generate(["a red cat"], params, use_tqdm=False)
        return group.samples[0], engine.runner.backend

    roomy, backend = rollout()
    assert backend._k is not None
    monkeypatch.setattr(TorchBackend, "_WORKSPACE_FLOOR", 0)
    bounded, backend = rollout()
    assert backend._k is None and backend.peak_workspace_bytes > 0  # a workspace first, the paged cache later
    assert bounded.reasoning_ids == roomy.reasoning_ids and torch.equal(bounded.image_tokens, roomy.image_tokens)
    torch.testing.assert_close(bounded.image_logprobs, roomy.image_logprobs, rtol=0, atol=1e-5)
