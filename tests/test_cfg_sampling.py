"""Fused CFG + sampling op (kernels/cfg_sampling.py, csrc/): torch path vs plain-torch oracles; CUDA kernel vs both."""
from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.cfg_sampling as cfg_sampling
from kernels.cfg_sampling import (
    SampleOutput,
    cfg_sample,
    cfg_sample_reference,
    cfg_sample_torch,
    cuda_extension_available,
    philox4x32_10,
    philox_uniforms,
    top_k_mask,
    top_k_mask_reference,
    top_p_mask,
    top_p_mask_reference,
)


def make_batch(rows: int, vocab: int, *, paired: bool, seed: int = 0, dtype=torch.float32, device="cpu",
               scale: float = 3.0):
    """Logits plus per-row parameters that mix greedy and sampled rows, filters on and off."""
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    uncond = (torch.randn(rows, vocab, generator=g) * scale).to(dtype) if paired else None
    cycle = lambda values: torch.tensor([values[i % len(values)] for i in range(rows)])  # noqa: E731
    params = dict(
        cfg_weight=torch.rand(rows, generator=g) * 6,
        temperature=cycle([0.0, 1.0, 0.7, 1.3, 0.5]).float(),
        top_k=cycle([0, 5, 50, 0, 1, vocab, vocab - 1]).long(),
        top_p=cycle([1.0, 0.9, 1.0, 0.5, 0.95, 0.3]).float(),
        seeds=torch.randint(-2**62, 2**62, (rows,), generator=g),
        counters=torch.randint(0, 2**40, (rows,), generator=g),
    )
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(cond), to(uncond), {k: to(v) for k, v in params.items()}


def reference(cond, uncond, params) -> SampleOutput:
    uniforms = philox_uniforms(params["seeds"], params["counters"], cond.shape[1])
    kwargs = {k: v for k, v in params.items() if k not in ("seeds", "counters")}
    return cfg_sample_reference(cond, uncond, **kwargs, uniforms=uniforms)


def assert_same(a: SampleOutput, b: SampleOutput) -> None:
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.mixed_logprobs, b.mixed_logprobs)


# ---------------------------------------------------------------------------------------------------- Philox


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32 10 (counter, key -> output)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in cases:
        out = philox4x32_10(tuple(torch.tensor([x]) for x in ctr), tuple(torch.tensor([x]) for x in key))
        assert tuple(int(w) for w in out) == expected


def test_philox_uniforms_range_determinism_batch_invariance():
    seeds = torch.tensor([0, -1, 2**62 + 5, 12345, -(2**63)])
    counters = torch.tensor([0, 7, 2**33 + 1, 575, 2**63 - 1])
    u = philox_uniforms(seeds, counters, 1001)
    assert u.shape == (5, 1001) and u.dtype == torch.float32
    assert bool((u > 0).all() and (u < 1).all())
    assert torch.equal(u, philox_uniforms(seeds, counters, 1001))
    for r in range(5):  # a row alone == in the batch == in a reordered batch
        assert torch.equal(philox_uniforms(seeds[r : r + 1], counters[r : r + 1], 1001)[0], u[r])
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(philox_uniforms(seeds[perm], counters[perm], 1001), u[perm])
    assert torch.equal(philox_uniforms(seeds, counters, 37), u[:, :37])  # index i's number ignores V
    # different keys / counters give different streams; the values look uniform
    assert not torch.equal(u[0], u[1])
    big = philox_uniforms(torch.tensor([3]), torch.tensor([9]), 200_000)[0]
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    # the sampling hot path's fused Philox + Gumbel is these uniforms' Gumbel noise, bit for bit
    s = torch.randn(5, 1001, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(5, 1001, generator=torch.Generator().manual_seed(1)) < 0.3
    keys = s + cfg_sampling._gumbel(u)
    assert torch.equal(cfg_sampling._sampling_keys(s, None, seeds, counters), keys)
    assert torch.equal(cfg_sampling._sampling_keys(s, keep, seeds, counters), keys.masked_fill(~keep, -math.inf))


# ---------------------------------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_torch_path_equals_reference(monkeypatch, paired, dtype, cpu_kernels):
    """Greedy and sampled rows, per-row temperature / top-k / top-p, in one call: bitwise equal, with the C++
    kernels the torch path uses on a CPU (where a compiler builds them) and without."""
    if not cpu_kernels:
        monkeypatch.setattr(cfg_sampling, "_sample_cpu_library", lambda: None)
    cond, uncond, params = make_batch(21, 300, paired=paired, dtype=dtype, seed=1)
    out = cfg_sample_torch(cond, uncond, **params)
    ref = reference(cond, uncond, params)
    assert_same(out, ref)
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert_same(cfg_sample(cond, uncond, **params), ref)  # the dispatcher takes the torch path on CPU


def test_greedy_rows():
    cond, uncond, params = make_batch(8, 64, paired=True, seed=2)
    params["temperature"].zero_()
    out = cfg_sample_torch(cond, uncond, **params)
    mixed = uncond + params["cfg_weight"][:, None] * (cond - uncond)
    assert torch.equal(out.tokens, mixed.argmax(1))
    ties = torch.zeros(2, 10)
    ties[:, [3, 7]] = 1.0
    one = dict(cfg_weight=torch.ones(2), temperature=torch.zeros(2), top_k=torch.zeros(2, dtype=torch.long),
               top_p=torch.ones(2), seeds=torch.zeros(2, dtype=torch.long), counters=torch.zeros(2, dtype=torch.long))
    assert cfg_sample_torch(ties, None, **one).tokens.tolist() == [3, 3]  # lowest index on ties


def test_column_strided_logits_equal_contiguous_ones():
    """Logits whose rows are not unit-stride (a transposed buffer) are read by index, not by memory order."""
    cond, uncond, params = make_batch(9, 40, paired=True, seed=7)
    strided = [x.T.contiguous().T for x in (cond, uncond)]
    assert strided[0].stride(1) != 1 and torch.equal(strided[0], cond)
    ref = reference(cond, uncond, params)
    assert_same(cfg_sample_torch(*strided, **params), ref)
    unpaired = cfg_sample_torch(strided[0], None, **params)
    assert_same(unpaired, reference(cond, None, params))


def test_logprob_values():
    cond, uncond, params = make_batch(10, 50, paired=True, seed=3)
    out = cfg_sample_torch(cond, uncond, **params)
    t = params["temperature"].clone()
    t[t == 0] = 1.0
    mixed = uncond + params["cfg_weight"][:, None] * (cond - uncond)
    rows = torch.arange(10)
    expect_c = torch.log_softmax(cond.double() / t[:, None], 1)[rows, out.tokens]
    expect_m = torch.log_softmax(mixed.double() / t[:, None], 1)[rows, out.tokens]
    torch.testing.assert_close(out.logprobs.double(), expect_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mixed_logprobs.double(), expect_m, atol=1e-5, rtol=0)
    unpaired = cfg_sample_torch(cond, None, **params)
    assert torch.equal(unpaired.logprobs, unpaired.mixed_logprobs)
    expect_u = torch.log_softmax(cond.double() / t[:, None], 1)[rows, unpaired.tokens]
    torch.testing.assert_close(unpaired.logprobs.double(), expect_u, atol=1e-5, rtol=0)


def test_masked_tokens_stay_masked():
    """-inf in both rows of a pair stays -inf after mixing (u + w (c - u) would be NaN) and is never drawn."""
    cond, uncond, params = make_batch(12, 40, paired=True, seed=4)
    cond[:, ::2] = -math.inf
    uncond[:, ::2] = -math.inf
    out = cfg_sample_torch(cond, uncond, **params)
    assert bool((out.tokens % 2 == 1).all())
    assert bool(torch.isfinite(out.logprobs).all() and torch.isfinite(out.mixed_logprobs).all())
    assert_same(out, reference(cond, uncond, params))


# ---------------------------------------------------------------------------------------------------- filters


def test_filter_semantics_by_hand():
    s = torch.tensor([[3.0, 1.0, 3.0, 3.0, 2.0, 0.0]])
    assert top_k_mask(s, torch.tensor([2])).tolist() == [[True, False, True, True, False, False]]  # ties kept
    assert top_k_mask(s, torch.tensor([4])).tolist() == [[True, False, True, True, True, False]]
    assert top_k_mask(s, torch.tensor([0])).all() and top_k_mask(s, torch.tensor([6])).all()
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    for mask in (top_p_mask, top_p_mask_reference):  # the oracle too: the property tests trust it
        assert mask(p, torch.tensor([0.5])).tolist() == [[True, False, False, False]]  # mass 0.5 reaches 0.5
        assert mask(p, torch.tensor([0.6])).tolist() == [[True, True, False, False]]
        assert mask(p, torch.tensor([0.8])).tolist() == [[True, True, True, True]]  # tie at the boundary
        assert mask(p, torch.tensor([1e-6])).tolist() == [[True, False, False, False]]  # always >= 1 token
        # top_p 1 is off: keeps even tokens that add no mass (the rest already sums to 1)
        assert mask(torch.tensor([[0.5, 0.25, 0.25, 0.0]]), torch.tensor([1.0])).all()


def test_top_k_reference_matches_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper

    g = torch.Generator().manual_seed(5)
    scores = torch.randint(-3, 4, (6, 30), generator=g).float()
    for k in (1, 3, 10, 29):
        hf = TopKLogitsWarper(top_k=k, filter_value=-math.inf)(None, scores.clone())
        assert torch.equal(top_k_mask_reference(scores, torch.full((6,), k)), torch.isfinite(hf))


logits_with_ties = st.integers(1, 4).flatmap(lambda rows: st.integers(1, 40).flatmap(lambda vocab: st.tuples(
    st.just((rows, vocab)),
    st.lists(st.integers(-4, 4), min_size=rows * vocab, max_size=rows * vocab),
    st.floats(0.1, 3.0),
)))


@settings(max_examples=60, deadline=None)
@given(data=logits_with_ties, ks=st.lists(st.integers(0, 45), min_size=4, max_size=4))
def test_top_k_mask_equals_sorting_reference(data, ks):
    (rows, vocab), values, scale = data
    scaled = torch.tensor(values, dtype=torch.float32).view(rows, vocab) * scale
    top_k = torch.tensor(ks[:rows])
    assert torch.equal(top_k_mask(scaled, top_k), top_k_mask_reference(scaled, top_k))


@settings(max_examples=60, deadline=None)
@given(data=logits_with_ties, ps=st.lists(st.floats(1e-3, 1.0), min_size=4, max_size=4))
def test_top_p_mask_equals_sorting_reference(data, ps):
    (rows, vocab), values, scale = data
    probs = torch.softmax(torch.tensor(values, dtype=torch.float32).view(rows, vocab) * scale, dim=-1)
    top_p = torch.tensor(ps[:rows], dtype=torch.float32)
    assert torch.equal(top_p_mask(probs, top_p), top_p_mask_reference(probs, top_p))


# ---------------------------------------------------------------------------------------------------- distribution


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of integer draws to `probs` (zero-probability tokens must be absent)."""
    support = probs > 0
    assert bool((support[tokens]).all()), "a filtered-out token was drawn"
    counts = torch.bincount(tokens, minlength=probs.numel()).double()[support]
    expected = probs.double()[support] * tokens.numel()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def filtered_distribution(cond, uncond, w, t, k, p) -> torch.Tensor:
    """The distribution the op should sample from, via the sorting references."""
    s = (uncond + w * (cond - uncond)) / t
    keep = top_k_mask_reference(s[None], torch.tensor([k]))[0]
    probs = torch.softmax(s.masked_fill(~keep, -math.inf), -1)
    keep &= top_p_mask_reference(probs[None], torch.tensor([p]))[0]
    return torch.softmax(s.masked_fill(~keep, -math.inf), -1)


def chi_square_draws(device: str, sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6000 draws (one per counter, fixed seed) on a 10-token vocabulary; returns them with the filtered
    distribution and, for the power check, the distribution with top-p left out."""
    draws, vocab = 6000, 10
    g = torch.Generator().manual_seed(6)
    cond, uncond = torch.randn(vocab, generator=g), torch.randn(vocab, generator=g)
    w, t, k, p = 1.5, 2.0, 8, 0.9
    expected = filtered_distribution(cond, uncond, w, t, k, p)
    assert int((expected > 0).sum()) == 6  # top-k drops 2 tokens, top-p 2 more
    full = lambda value: torch.full((draws,), value, device=device)  # noqa: E731
    out = sample(cond.expand(draws, vocab).contiguous().to(device), uncond.expand(draws, vocab).contiguous().to(device),
                 cfg_weight=full(w), temperature=full(t), top_k=full(k), top_p=full(p), seeds=full(2024),
                 counters=torch.arange(draws, device=device))
    return out.tokens.cpu(), expected, filtered_distribution(cond, uncond, w, t, k, 1.0)


def test_sampled_tokens_follow_filtered_distribution():
    tokens, expected, without_top_p = chi_square_draws("cpu", cfg_sample_torch)
    assert chi_square_pvalue(tokens, expected) > 1e-3
    with pytest.raises(AssertionError, match="filtered-out"):  # the test can fail: it sees a missing filter
        chi_square_pvalue(torch.cat([tokens, torch.tensor([0])]), expected)
    assert chi_square_pvalue(tokens, without_top_p) < 1e-6  # and sees top-p left out


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    cond, uncond, params = make_batch(4, 16, paired=True)

    filters = {k: v for k, v in params.items() if k not in ("seeds", "counters")}

    def call(c=cond, u=uncond, **override):
        return cfg_sample(c, u, **{**params, **override})

    cases = [
        (lambda: call(u=uncond[:, :8]), "uncond_logits shape"),
        (lambda: call(u=uncond[:3]), "uncond_logits shape"),
        (lambda: call(c=cond[0]), r"\[R, V\]"),
        (lambda: call(c=cond.long(), u=None), "fp32/bf16/fp16"),
        (lambda: call(u=uncond.half()), "must match"),
        (lambda: call(temperature=torch.tensor([1.0, -0.5, 1.0, 1.0])), "temperature"),
        (lambda: call(temperature=torch.tensor([1.0, math.nan, 1.0, 1.0])), "temperature"),
        (lambda: call(temperature=torch.tensor([1.0, math.inf, 1.0, 1.0])), "temperature"),
        (lambda: call(top_p=torch.tensor([1.0, 0.0, 1.0, 1.0])), "top_p"),
        (lambda: call(top_p=torch.tensor([1.0, 1.5, 1.0, 1.0])), "top_p"),
        (lambda: call(top_k=torch.tensor([0, -1, 0, 0])), "top_k"),
        (lambda: call(top_k=torch.zeros(4)), "integer"),
        (lambda: call(top_k=torch.zeros(4, dtype=torch.bool)), "integer"),
        (lambda: call(top_k=torch.zeros(4, dtype=torch.long, device="meta")), "top_k is on meta"),
        (lambda: call(c=torch.zeros(4, 0), u=None), "empty vocabulary"),
        (lambda: call(seeds=torch.zeros(3, dtype=torch.long)), r"shape \[4\]"),
        (lambda: call(cfg_weight=torch.tensor([1.0, math.inf, 1.0, 1.0])), "cfg_weight"),
        (lambda: cfg_sample_reference(cond, uncond, **filters, uniforms=torch.full((4, 15), 0.5)), "uniforms shape"),
        (lambda: cfg_sample_reference(cond, uncond, **filters, uniforms=torch.zeros(4, 16)), r"\(0, 1\)"),
        (lambda: philox_uniforms(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), 5), "length"),
        (lambda: philox_uniforms(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0), "vocab"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_empty_batch():
    cond, uncond, params = make_batch(0, 16, paired=True)
    out = cfg_sample(cond, uncond, **params)
    assert out.tokens.shape == (0,) and out.logprobs.shape == (0,)


def test_no_extension_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cuda_extension_available() is False


# ---------------------------------------------------------------------------------------------------- kernel on CPU
# csrc/host_emulation.cpp runs the kernel's device code (csrc/cfg_sample_kernel.cuh) with one std::thread per
# CUDA thread, so its radix selects, scans, reductions and Philox are checked here without a GPU.

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cuda_include_flags() -> list[str] | None:
    """-I flags for the CUDA toolkit headers, from nvcc's dry run (nvcc may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    found = re.search(r'^#\$ INCLUDES="(.*)"', dry.stdout + dry.stderr, re.MULTILINE)
    return found.group(1).replace('"', "").split() if found else None


@functools.cache
def emulation(threads: int) -> ctypes.CDLL:
    includes, cxx = cuda_include_flags(), shutil.which("g++")
    if includes is None or cxx is None:
        pytest.skip("the kernel emulation needs g++ and the CUDA toolkit headers")
    with tempfile.TemporaryDirectory(prefix="cfg_sample_emulation_") as tmp:  # a loaded library outlives its file
        lib = Path(tmp) / f"emulation{threads}.so"
        subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-pthread", *includes,
                        f"-DGOTR1_CFG_SAMPLE_THREADS={threads}", str(CSRC / "host_emulation.cpp"), "-o", str(lib)],
                       check=True)
        return ctypes.CDLL(str(lib))


def emulated_sample(threads: int, cond, uncond, splits: int = 1, **params) -> SampleOutput:
    """The kernel run on the CPU through csrc/host_emulation.cpp with `splits` blocks per row, into poisoned
    outputs."""
    rows, vocab = cond.shape
    out = SampleOutput(torch.full((rows,), -1, dtype=torch.int64), torch.full((rows,), math.nan),
                       torch.full((rows,), math.nan))
    inputs = [params["cfg_weight"].float().contiguous(), params["temperature"].float().contiguous(),
              params["top_k"].long().contiguous(), params["top_p"].float().contiguous(),
              params["seeds"].long().contiguous(), params["counters"].long().contiguous()]
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    dtype = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[cond.dtype]
    status = emulation(threads).gotr1_cfg_sample_emulate(
        ptr(cond), ptr(uncond), ctypes.c_int64(cond.stride(0)),
        ctypes.c_int64(0 if uncond is None else uncond.stride(0)), ctypes.c_int64(rows), ctypes.c_int64(vocab),
        ctypes.c_int(dtype), *map(ptr, inputs), ptr(out.tokens), ptr(out.logprobs), ptr(out.mixed_logprobs),
        ctypes.c_int64(splits))
    assert status == 0
    return out


def assert_kernel_matches(out: SampleOutput, ref: SampleOutput) -> None:
    assert torch.equal(out.tokens, ref.tokens), (out.tokens, ref.tokens)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.mixed_logprobs, ref.mixed_logprobs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_kernel_matches_torch_path(paired, dtype):
    cond, uncond, params = make_batch(14, 1001, paired=paired, dtype=dtype, seed=11)
    out = emulated_sample(64, cond, uncond, **params)
    assert_kernel_matches(out, cfg_sample_torch(cond, uncond, **params))
    if not paired:
        assert torch.equal(out.logprobs, out.mixed_logprobs)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize(("vocab", "splits"), [(1001, 2), (1001, 3), (203, 7), (50, 16)])
def test_emulated_split_rows_match_torch_path(paired, vocab, splits):
    """Greedy and unfiltered rows split over several blocks (the last ones short or, with 16 splits of 13 groups
    of 4, empty) and merged, beside filtered rows that one block samples whole: the torch path's tokens, its
    log-probs up to the order of the sums."""
    cond, uncond, params = make_batch(14, vocab, paired=paired, dtype=torch.bfloat16, seed=21)
    out = emulated_sample(64, cond, uncond, splits=splits, **params)
    assert_kernel_matches(out, cfg_sample_torch(cond, uncond, **params))
    one_pass = (params["temperature"] == 0) | (((params["top_k"] == 0) | (params["top_k"] >= vocab))
                                              & (params["top_p"] >= 1))
    assert 0 < int(one_pass.sum()) < 14  # both kinds of row are in the batch


def test_emulated_split_ties_and_masked_slices():
    """Ties across slices go to the lowest index, and a slice whose logits are all -inf (in both rows of a pair)
    adds nothing: greedy rows of integer logits, sampled rows with their first half masked."""
    rows, vocab = 6, 512
    g = torch.Generator().manual_seed(22)
    cond = torch.randint(0, 3, (rows, vocab), generator=g).float()
    uncond = cond.clone()
    cond[3:, :256] = uncond[3:, :256] = -math.inf
    _, _, params = make_batch(rows, vocab, paired=True, seed=22)
    params.update(temperature=torch.tensor([0.0, 0.0, 0.0, 1.0, 0.7, 0.0]), top_k=torch.zeros(rows, dtype=torch.long),
                  top_p=torch.ones(rows))
    out = emulated_sample(64, cond, uncond, splits=4, **params)
    assert_kernel_matches(out, cfg_sample_torch(cond, uncond, **params))
    assert out.tokens[:3].tolist() == (cond[:3] == 2).float().argmax(1).tolist()  # the first 2 of each row
    assert bool((out.tokens[3:] >= 256).all())


def test_split_count():
    """Blocks per row: enough to fill the SMs twice over, at most one per thread's group of 4 tokens."""
    splits = emulation(1024).gotr1_cfg_sample_splits_for
    splits.restype = ctypes.c_int64
    count = lambda rows, vocab, sms: splits(*(ctypes.c_int64(x) for x in (rows, vocab, sms)))  # noqa: E731
    assert count(16, 102400, 132) == 17  # a step's text rows: ceil(264 / 16), vocab allows 25
    assert count(16, 16384, 132) == 4  # its image pairs: 16384 tokens are 4 blocks of 1024 threads x 4
    assert count(64, 102400, 132) == 5
    assert count(264, 102400, 132) == 1  # the rows alone fill the device
    assert count(2, 4099, 132) == 1  # fewer groups of 4 than two blocks' threads
    assert count(1, 8192, 132) == 2


def test_emulated_kernel_ties_masks_and_strided_rows():
    """Integer logits (ties at the top-k / top-p boundaries), -inf in both rows of a pair, rows with a stride
    that rules out vector loads, a vocabulary that is not a multiple of 4."""
    rows, vocab = 12, 203
    cond, uncond, params = make_batch(rows, vocab, paired=True, seed=12)
    g = torch.Generator().manual_seed(12)
    wide = torch.randint(-3, 4, (2, rows, vocab + 1), generator=g).float()
    cond, uncond = wide[0, :, :vocab], wide[1, :, :vocab]  # row stride vocab + 1
    cond[:, 5::7] = -math.inf
    uncond[:, 5::7] = -math.inf
    params["cfg_weight"] = torch.tensor([1.0, 2.0, 3.0, 0.5] * 3)
    out = emulated_sample(64, cond, uncond, **params)
    assert_kernel_matches(out, cfg_sample_torch(cond, uncond, **params))


def test_emulated_kernel_full_block():
    """The production block size (1024 threads, 2 histogram bins per thread), on two rows."""
    cond, uncond, params = make_batch(3, 4099, paired=True, dtype=torch.bfloat16, seed=13)
    params.update(temperature=torch.tensor([1.0, 0.8, 0.0]), top_k=torch.tensor([50, 0, 7]),
                  top_p=torch.tensor([0.9, 0.8, 1.0]))
    out = emulated_sample(1024, cond, uncond, **params)
    assert_kernel_matches(out, cfg_sample_torch(cond, uncond, **params))
    split = emulated_sample(1024, cond, uncond, splits=2, **params)  # the greedy row splits
    assert_kernel_matches(split, cfg_sample_torch(cond, uncond, **params))


# ---------------------------------------------------------------------------------------------------- CUDA kernel

needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_extension_available()),
                                  reason="needs a CUDA device and the csrc/ extension")


def cuda_sample(cond, uncond, **params) -> SampleOutput:
    """The CUDA kernel, writing into outputs poisoned with NaN / -1 so unwritten rows show."""
    from kernels.cfg_sampling import cfg_sample_cuda

    rows, device = cond.shape[0], cond.device
    out = SampleOutput(torch.full((rows,), -1, dtype=torch.int64, device=device),
                       torch.full((rows,), math.nan, device=device), torch.full((rows,), math.nan, device=device))
    return cfg_sample_cuda(cond, uncond, **params, out=out)


@needs_kernel
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [16384, 1001])
def test_cuda_matches_torch_path(paired, dtype, vocab):
    cond, uncond, params = make_batch(64, vocab, paired=paired, dtype=dtype, seed=7, device="cuda")
    out = cuda_sample(cond, uncond, **params)
    ref = cfg_sample_torch(cond.cpu(), None if uncond is None else uncond.cpu(),
                           **{k: v.cpu() for k, v in params.items()})
    greedy = params["temperature"].cpu() == 0
    assert torch.equal(out.tokens.cpu()[greedy], ref.tokens[greedy])
    # sampled tokens: equal up to rounding of probabilities at a top-p boundary (rare); demand 62 of 64 rows
    assert int((out.tokens.cpu() == ref.tokens).sum()) >= 62
    same = out.tokens.cpu() == ref.tokens
    torch.testing.assert_close(out.logprobs.cpu()[same], ref.logprobs[same], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.mixed_logprobs.cpu()[same], ref.mixed_logprobs[same], atol=2e-5, rtol=1e-5)
    if not paired:
        assert torch.equal(out.logprobs, out.mixed_logprobs)


@needs_kernel
def test_cuda_tokens_equal_torch_path_without_top_p():
    """Without top-p every decision is an exact fp32 comparison, so tokens agree exactly."""
    cond, uncond, params = make_batch(128, 16384, paired=True, dtype=torch.bfloat16, seed=8, device="cuda")
    params["top_p"].fill_(1.0)
    out = cuda_sample(cond, uncond, **params)
    ref = cfg_sample_torch(cond.cpu(), uncond.cpu(), **{k: v.cpu() for k, v in params.items()})
    assert torch.equal(out.tokens.cpu(), ref.tokens)


@needs_kernel
def test_cuda_greedy_equals_reference():
    cond, uncond, params = make_batch(32, 102400, paired=False, seed=9, device="cuda")
    params["temperature"].zero_()
    out = cuda_sample(cond, uncond, **params)
    ref = reference(cond.cpu(), None, {k: v.cpu() for k, v in params.items()})
    assert torch.equal(out.tokens.cpu(), ref.tokens)
    torch.testing.assert_close(out.logprobs.cpu(), ref.logprobs, atol=2e-5, rtol=1e-5)


@needs_kernel
def test_cuda_sampled_tokens_follow_filtered_distribution():
    tokens, expected, _ = chi_square_draws("cuda", cuda_sample)
    assert chi_square_pvalue(tokens, expected) > 1e-3


@needs_kernel
def test_cuda_dispatch_and_batch_invariance():
    cond, uncond, params = make_batch(16, 4096, paired=True, seed=10, device="cuda")
    out = cfg_sample(cond, uncond, **params)
    for r in range(16):
        alone = cfg_sample(cond[r : r + 1], uncond[r : r + 1], **{k: v[r : r + 1] for k, v in params.items()})
        assert int(alone.tokens) == int(out.tokens[r])


def test_top_p_that_underflows_float32_keeps_the_most_likely_token():
    """A top_p too small for fp32 (SamplingParams accepts 1e-50; the sampler's fp32 tensor holds 0) keeps the most
    likely token and its ties, as the sorting reference does, instead of filtering out every token (which drew
    token 0 whatever the logits)."""
    probs = torch.softmax(torch.tensor([[0.0, 2.0, 1.0, 2.0], [3.0, 1.0, 0.0, -1.0]]), -1)
    zero = torch.tensor([1e-50, 1e-50], dtype=torch.float32)
    assert top_p_mask(probs, zero).tolist() == [[False, True, False, True], [True, False, False, False]]
    assert torch.equal(top_p_mask(probs, zero), top_p_mask_reference(probs, zero))
    cond, uncond, params = make_batch(6, 50, paired=True, seed=7)
    params.update(temperature=torch.full((6,), 0.8), top_p=torch.full((6,), 1e-50, dtype=torch.float32))
    out = cfg_sample_torch(cond, uncond, **params, validate=False)
    mixed = uncond + params["cfg_weight"][:, None] * (cond - uncond)
    assert torch.equal(out.tokens, mixed.argmax(1))


def test_emulated_kernel_top_p_that_underflows_float32():
    """The CUDA kernel's radix select, like the torch path's, never selects an empty digit (with top_p 0 every digit
    "reaches" the target): the most likely token is kept."""
    cond, uncond, params = make_batch(6, 50, paired=True, seed=7)
    params.update(temperature=torch.full((6,), 0.8), top_p=torch.full((6,), 1e-50, dtype=torch.float32))
    out = emulated_sample(64, cond, uncond, **params)
    assert_kernel_matches(out, cfg_sample_torch(cond, uncond, **params, validate=False))
