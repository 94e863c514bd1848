"""Paged decode and prefill/extend attention: the torch reference against per-sequence SDPA (the outside oracle),
the Triton kernels against the reference.

Cache slots that no sequence may read (free blocks, tails of last blocks) hold NaN, so a kernel that reads past a
context or through a wrong table entry fails. Outputs are poisoned through the `poison` fixture. The shared test
helpers (`poison`, `gpu_rounding`, `max_rel_err`, `norm_rel_err`) live here, once; the other kernel tests import them.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.paged_attention import (
    SHARED_ROWS,
    RopeStore,
    _check_shared,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    shared_prefixes,
)
from kernels.rope import rope_store
from kernels.serial_split import counters

# Data is built on the CPU (seeded generators), then moved here: the kernels compile for real when a GPU is present.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in fp64: the robust measure for bf16 results (fla's `assert_close`)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| in fp64; NaN anywhere gives NaN, which fails every `<` assertion."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0
    if torch.isnan(a).any() or torch.isnan(e).any():
        return float("nan")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(DEVICE)


def paged_case(ctx_lens, *, hkv, d, block_size, dtype=torch.float32, shared_prefix_blocks=0, seed=0,
               table_dtype=torch.int32, table_fill=-1):
    """Random paged caches and block tables for sequences of `ctx_lens` tokens. The first `shared_prefix_blocks`
    blocks of every sequence are the same physical blocks (a cached shared prompt)."""
    g = torch.Generator().manual_seed(seed)
    nblks = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(nblks) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(ctx_lens), max(nblks, default=0) + 1), table_fill, dtype=table_dtype)
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    filled = set()
    for b, c in enumerate(ctx_lens):
        for j in range(nblks[b]):
            table[b, j] = perm[j] if j < shared_prefix_blocks else perm.pop()
            blk, n = int(table[b, j]), min(block_size, c - j * block_size)
            if blk not in filled:
                filled.add(blk)
                k_cache[blk, :n] = torch.randn(n, hkv, d, generator=g).to(dtype)
                v_cache[blk, :n] = torch.randn(n, hkv, d, generator=g).to(dtype)
    return (k_cache.to(DEVICE), v_cache.to(DEVICE), table.to(DEVICE),
            torch.tensor(ctx_lens, dtype=table_dtype, device=DEVICE))


def sequence_kv(cache, table, b, ctx):
    """Contiguous `[ctx, Hkv, D]` K or V of sequence b, read block by block (the oracle's own gather)."""
    bs = cache.shape[1]
    return torch.cat([cache[int(table[b, j])] for j in range(-(-ctx // bs))])[:ctx] if ctx else cache[0, :0]


def sdpa_oracle(q, k_cache, v_cache, table, cu_q, ctx_lens, scale):
    """Causal attention per sequence with torch's SDPA on gathered, head-repeated K/V, in fp32 on the CPU."""
    q, k_cache, v_cache, table = q.cpu(), k_cache.cpu(), v_cache.cpu(), table.cpu()
    out = torch.zeros(q.shape, dtype=torch.float32)
    group = q.shape[1] // k_cache.shape[2]
    for b, ctx in enumerate(ctx_lens.tolist()):
        s, e = int(cu_q[b]), int(cu_q[b + 1])
        if e == s:
            continue
        k = sequence_kv(k_cache, table, b, ctx).float().repeat_interleave(group, 1).transpose(0, 1)
        v = sequence_kv(v_cache, table, b, ctx).float().repeat_interleave(group, 1).transpose(0, 1)
        pos_q = ctx - (e - s) + torch.arange(e - s)
        mask = torch.arange(ctx)[None] <= pos_q[:, None]
        out[s:e] = F.scaled_dot_product_attention(q[s:e].float().transpose(0, 1), k, v, attn_mask=mask,
                                                  scale=scale).transpose(0, 1)
    return out


def decode_oracle(q, k_cache, v_cache, table, ctx_lens, scale):
    ctx_lens = ctx_lens.cpu()
    out = sdpa_oracle(q, k_cache, v_cache, table, torch.arange(q.shape[0] + 1), ctx_lens.clamp(min=1), scale)
    return out.masked_fill(ctx_lens[:, None, None] == 0, 0.0)


def packed_queries(q_lens, hq, d, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return torch.randn(int(cu[-1]), hq, d, generator=g).to(DEVICE, dtype), cu.to(DEVICE)


# (num_q_heads, num_kv_heads, head_dim, block_size): MHA, GQA with odd group and head_dim, MQA, a real head_dim.
CONFIGS = [(4, 4, 16, 16), (6, 2, 24, 4), (3, 3, 24, 4), (5, 1, 8, 4), (4, 2, 128, 16)]
CTX = [1, 5, 17, 40]


@pytest.mark.parametrize("hq,hkv,d,bs", CONFIGS[:3])
def test_references_match_sdpa(hq, hkv, d, bs):
    k_cache, v_cache, table, ctx = paged_case(CTX, hkv=hkv, d=d, block_size=bs)
    scale = 1 / math.sqrt(d)
    q = randn(len(CTX), hq, d)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, scale=scale)
    assert max_rel_err(ref, decode_oracle(q, k_cache, v_cache, table, ctx, scale)) < 1e-5
    qp, cu = packed_queries([1, 5, 9, 40], hq, d)
    ref = paged_prefill_attention_reference(qp, k_cache, v_cache, table, cu, ctx, scale=scale)
    assert max_rel_err(ref, sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, scale)) < 1e-5


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("hq,hkv,d,bs", CONFIGS)
@pytest.mark.usefixtures("poison")
def test_decode_fp32(hq, hkv, d, bs, num_splits):
    k_cache, v_cache, table, ctx = paged_case(CTX, hkv=hkv, d=d, block_size=bs)
    q = randn(len(CTX), hq, d)
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=num_splits)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, scale=0.3)
    assert out.dtype == q.dtype
    assert max_rel_err(out, ref) < 1e-5
    assert not counters(DEVICE, 0).any()  # each (row, KV head)'s merging program reset its counter


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("hq,hkv,d,bs", [CONFIGS[0], CONFIGS[1]])
@pytest.mark.usefixtures("poison")
def test_decode_bf16(hq, hkv, d, bs, num_splits):
    k_cache, v_cache, table, ctx = paged_case(CTX, hkv=hkv, d=d, block_size=bs, dtype=torch.bfloat16)
    q = randn(len(CTX), hq, d).bfloat16()
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=num_splits)
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out, decode_oracle(q, k_cache, v_cache, table, ctx, 0.3)) < 1e-2


@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("hq,hkv,d,bs", [CONFIGS[0], CONFIGS[1]])
@pytest.mark.usefixtures("poison")
def test_decode_launch_variants(hq, hkv, d, bs, upcast):
    """The matrix-unit path for one query row per KV head (padded to 16) and 16-bit operands, as the sweep runs
    them: fp32 tight, bf16 in the band (16-bit operands only compiled: the interpreter's bf16 dot is broken)."""
    cases = [(torch.float32, 1e-5)] + ([(torch.bfloat16, 1e-2)] if upcast or DEVICE.type == "cuda" else [])
    for dtype, tol in cases:
        k_cache, v_cache, table, ctx = paged_case(CTX, hkv=hkv, d=d, block_size=bs, dtype=dtype)
        q = randn(len(CTX), hq, d).to(dtype)
        for splits, block_n in ((1, 32), (3, 64)):
            out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=splits,
                                         block_n=block_n, use_dot=True, upcast=upcast)
            assert max_rel_err(out, decode_oracle(q, k_cache, v_cache, table, ctx, 0.3)) < tol
    if hq != hkv or not upcast:
        message = "upcast=False needs use_dot" if hq == hkv else "one query head per KV head"
        with pytest.raises(ValueError, match=message):
            paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, use_dot=False, upcast=upcast)


@pytest.mark.usefixtures("poison")
def test_decode_padding_rows_and_int64_tables():
    """Context 0 (CUDA-graph padding rows) gives 0; int64 tables padded with 0 rather than -1 work too."""
    k_cache, v_cache, table, ctx = paged_case([0, 7, 0, 33], hkv=2, d=16, block_size=4,
                                              table_dtype=torch.int64, table_fill=0)
    q = randn(4, 4, 16)
    for splits in (1, 4):
        out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.25, num_splits=splits)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, scale=0.25)
        assert torch.equal(out[[0, 2]], torch.zeros(2, 4, 16, device=DEVICE))
        assert torch.equal(ref[[0, 2]], out[[0, 2]])
        assert max_rel_err(out, ref) < 1e-5


@pytest.mark.usefixtures("poison")
def test_decode_long_context_many_splits():
    k_cache, v_cache, table, ctx = paged_case([300, 129], hkv=1, d=16, block_size=16)
    q = randn(2, 2, 16)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, scale=0.25)
    for splits in (2, 5, 7):  # 7 splits of 300 tokens leave empty splits for the 129-token row
        out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.25, num_splits=splits)
        assert max_rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("hq,hkv,d,bs", CONFIGS)
@pytest.mark.usefixtures("poison")
def test_prefill_fp32(hq, hkv, d, bs):
    """Prefill from scratch (q_len == context), extension of a prefix, an empty and a one-token sequence."""
    k_cache, v_cache, table, ctx = paged_case([12, 40, 6, 1], hkv=hkv, d=d, block_size=bs)
    qp, cu = packed_queries([12, 23, 0, 1], hq, d)
    out = paged_prefill_attention(qp, k_cache, v_cache, table, cu, ctx, scale=0.3)
    ref = paged_prefill_attention_reference(qp, k_cache, v_cache, table, cu, ctx, scale=0.3)
    assert max_rel_err(out, ref) < 1e-5


@pytest.mark.usefixtures("poison")
def test_prefill_extends_shared_prefix():
    """Four samples share 3 cached prompt blocks, then each extends with its own tokens (prefix caching)."""
    k_cache, v_cache, table, ctx = paged_case([14, 17, 12, 30], hkv=2, d=24, block_size=4, shared_prefix_blocks=3)
    assert (table[:, :3] == table[0, :3]).all()
    qp, cu = packed_queries([2, 5, 0, 18], 4, 24)
    out = paged_prefill_attention(qp, k_cache, v_cache, table, cu, ctx, scale=0.2)
    oracle = sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, 0.2)
    assert max_rel_err(out, oracle) < 1e-5


@pytest.mark.usefixtures("poison")
def test_prefill_bf16():
    k_cache, v_cache, table, ctx = paged_case([12, 40], hkv=2, d=24, block_size=4, dtype=torch.bfloat16)
    qp, cu = packed_queries([12, 23], 6, 24, dtype=torch.bfloat16)
    out = paged_prefill_attention(qp, k_cache, v_cache, table, cu, ctx, scale=0.3)
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out, sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, 0.3)) < 1e-2


def test_prefill_of_one_token_equals_decode():
    k_cache, v_cache, table, ctx = paged_case(CTX, hkv=2, d=24, block_size=4)
    q = randn(len(CTX), 6, 24)
    cu = torch.arange(len(CTX) + 1, dtype=torch.int32, device=DEVICE)
    pre = paged_prefill_attention(q, k_cache, v_cache, table, cu, ctx, scale=0.3)
    dec = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=2)
    assert max_rel_err(pre, dec) < 1e-5


def test_bad_inputs_raise():
    k_cache, v_cache, table, ctx = paged_case([5, 9], hkv=2, d=8, block_size=4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(randn(2, 3, 8), k_cache, v_cache, table, ctx, scale=1.0)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(randn(2, 2, 8), k_cache, v_cache, table, ctx, scale=1.0, num_splits=0)
    bad_table = table.clone()
    bad_table[1, 1] = -1
    with pytest.raises(IndexError, match=r"block_tables\[1, 1\] = -1"):
        paged_decode_attention_reference(randn(2, 2, 8), k_cache, v_cache, bad_table, ctx, scale=1.0)
    qp, cu = packed_queries([5, 10], 2, 8)
    for fn in (paged_prefill_attention, paged_prefill_attention_reference):
        with pytest.raises(ValueError, match="already be in the cache"):
            fn(qp, k_cache, v_cache, table, cu, ctx, scale=1.0)
        with pytest.raises(ValueError, match="cu_seqlens_q must rise"):
            fn(qp, k_cache, v_cache, table, cu.flip(0), ctx, scale=1.0)
    with pytest.raises(ValueError, match="one query row per sequence"):
        paged_decode_attention(randn(3, 2, 8), k_cache, v_cache, table, ctx, scale=1.0)
    qp, cu = packed_queries([5, 9], 2, 8)
    with pytest.raises(ValueError, match="does not fit the block table"):
        paged_prefill_attention(qp, k_cache, v_cache, table[:, :2], cu, ctx, scale=1.0)
    strided_k = torch.cat([k_cache, k_cache], dim=-1)[..., ::2]  # the cache's shape, not contiguous
    assert strided_k.shape == k_cache.shape and not strided_k.is_contiguous()
    with pytest.raises(ValueError, match="must be contiguous"):
        paged_decode_attention(randn(2, 2, 8), strided_k, v_cache, table, ctx, scale=1.0)
    with pytest.raises(ValueError, match="must be contiguous"):
        paged_prefill_attention(qp, k_cache, strided_k, table, cu, ctx, scale=1.0)


@settings(max_examples=6, deadline=None)
@given(data=st.data(), hkv=st.integers(1, 3), group=st.integers(1, 3), d=st.integers(1, 40),
       bs=st.sampled_from([1, 4, 16]), splits=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_shapes(data, hkv, group, d, bs, splits, seed):
    ctx_lens = data.draw(st.lists(st.integers(1, 50), min_size=1, max_size=3))
    q_lens = [data.draw(st.integers(0, c)) for c in ctx_lens]
    k_cache, v_cache, table, ctx = paged_case(ctx_lens, hkv=hkv, d=d, block_size=bs, seed=seed)
    scale = 1 / math.sqrt(d)
    q = randn(len(ctx_lens), hkv * group, d)
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=scale, num_splits=splits)
    assert max_rel_err(out, decode_oracle(q, k_cache, v_cache, table, ctx, scale)) < 1e-5
    qp, cu = packed_queries(q_lens, hkv * group, d, seed=seed)
    out = paged_prefill_attention(qp, k_cache, v_cache, table, cu, ctx, scale=scale)
    assert max_rel_err(out, sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, scale)) < 1e-5


def run_case(groups: list[int], ctx_lens: list[int], prefix: dict[int, int], *, hkv: int, d: int,
             block_size: int, dtype=torch.float32, seed: int = 0):
    """Rows of the same group share the whole blocks of their group's first `prefix[group]` positions (a prompt,
    the pad prefix), each context reaching past them; every slot no row may read is NaN. Returns the case
    (`paged_case`'s order) and each row's `shared_prefixes`."""
    g = torch.Generator().manual_seed(seed)
    nblks = [-(-c // block_size) for c in ctx_lens]
    prefixes, next_block = {}, 0
    for grp, n in prefix.items():
        n //= block_size
        prefixes[grp], next_block = list(range(next_block, next_block + n)), next_block + n
    tables = []
    for grp, n in zip(groups, nblks):
        own = n - len(prefixes.get(grp, []))
        assert own > 0, "a context must reach past its group's prefix"
        tables.append(prefixes.get(grp, []) + list(range(next_block, next_block + own)))
        next_block += own
    k_cache = torch.full((next_block + 2, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for table, c in zip(tables, ctx_lens):
        for p in range(c):
            if k_cache[table[p // block_size], p % block_size].isnan().all():
                k_cache[table[p // block_size], p % block_size] = torch.randn(hkv, d, generator=g).to(dtype)
                v_cache[table[p // block_size], p % block_size] = torch.randn(hkv, d, generator=g).to(dtype)
    width = max(nblks) + 1
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    shared = torch.tensor(shared_prefixes(tables, [c - 1 for c in ctx_lens], block_size), dtype=torch.int32)
    return (k_cache.to(DEVICE), v_cache.to(DEVICE), table.to(DEVICE),
            torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE), shared.to(DEVICE))


def test_shared_prefixes_by_hand():
    """Rows 0-2 share two blocks of 16 (row 2 holds 20 positions of them: one whole tile; row 0 reads the
    longest), row 3 starts a run, row 4 shares one block with row 3 but row 3 holds only 10 positions: no whole
    tile, so row 4 starts its own. A run is at most `SHARED_ROWS` rows: the 17th starts the next."""
    tables = [[7, 8, 1], [7, 8, 2], [7, 8, 3], [4, 5], [4, 6]]
    held = [40, 33, 20, 10, 30]
    assert shared_prefixes(tables, held, 16) == [(0, 32), (0, 32), (0, 16), (3, 0), (4, 0)]
    assert shared_prefixes([[1, 2, 3]] * 18, [40] * 18, 16) == [(0, 32)] * 16 + [(16, 32)] * 2
    assert shared_prefixes([[5]], [9], 16) == [(0, 0)]


@settings(max_examples=200, deadline=None)
@given(families=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=1, max_size=40),
       bs=st.sampled_from([1, 4, 16]))
def test_shared_prefixes_are_valid_and_maximal(families, bs):
    """Rows drawn from a few prefix families (each row: its family's first blocks, then its own): every run
    `shared_prefixes` reports is one the kernels may rely on (`_check_shared`, the reference's check), and a row
    is left out of the run before it only when it shares less than a whole tile with the run's first row, or
    the run is full."""
    prefix_len = (0, 16, 20, 37)  # each family's shared positions (whole blocks of them are shared)
    tables, held, next_block = [], [], 1000
    for family, n in families:
        own = -(-(n + 1) // bs)
        shared_blocks = min(own - 1, prefix_len[family] // bs)
        tables.append(list(range(100 * family, 100 * family + shared_blocks))
                      + list(range(next_block, next_block + own - shared_blocks)))
        next_block += own
        held.append(n)
    runs = shared_prefixes(tables, held, bs)
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    _check_shared(padded, torch.tensor([h + 1 for h in held], dtype=torch.int32),
                  torch.tensor(runs, dtype=torch.int32), bs)
    for row in range(1, len(tables)):
        first = runs[row - 1][0]
        if runs[row][0] == row and row - first < SHARED_ROWS:  # started a run: it could not join
            pairs = list(zip(tables[row], tables[first]))
            same_blocks = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
            assert min(same_blocks * bs, held[row], held[first]) < 16


# (groups, contexts, shared positions per group): a group of 3 with its prompt, one of 2, a row alone, and 18 rows
# over one pad prefix (a run is cut at 16).
RUNS = [([0, 0, 0, 1, 1, 2], [30, 41, 23, 17, 29, 9], {0: 20, 1: 16}),
        ([3] * 18, [22 + i for i in range(18)], {3: 20})]


@pytest.mark.parametrize("groups,ctx_lens,prefix", RUNS)
@pytest.mark.parametrize("num_splits,shared_splits", [(1, 1), (1, 3), (3, 2)])
@pytest.mark.parametrize("hq,hkv,d,bs", [CONFIGS[0], CONFIGS[1], CONFIGS[3]])
@pytest.mark.usefixtures("poison")
def test_decode_cascade_equals_reference(groups, ctx_lens, prefix, num_splits, shared_splits, hq, hkv, d, bs):
    """Shared prefixes read once per run give the reference's attention, whatever the splits of either part; and
    a run's later rows read them only through its first row's table: with their own entries for those blocks
    pointing at a NaN block, the result is unchanged."""
    k_cache, v_cache, table, ctx, shared = run_case(groups, ctx_lens, prefix, hkv=hkv, d=d, block_size=bs)
    assert (shared[:, 1] > 0).sum() >= 3  # runs exist
    q = randn(len(ctx_lens), hq, d)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, scale=0.3, shared=shared)
    assert max_rel_err(ref, decode_oracle(q, k_cache, v_cache, table, ctx, 0.3)) < 1e-5
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=num_splits, shared=shared,
                                 shared_splits=shared_splits)
    assert max_rel_err(out, ref) < 1e-5
    columns = shared.t().contiguous().t()  # the same runs, column-major
    assert columns.stride(1) != 1
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=num_splits,
                                 shared=columns, shared_splits=shared_splits)
    assert max_rel_err(out, ref) < 1e-5
    blind = table.clone()
    for row, (first, n) in enumerate(shared.tolist()):
        if first != row:
            blind[row, :n // bs] = k_cache.shape[0] - 1  # a block no row holds: NaN
    out = paged_decode_attention(q, k_cache, v_cache, blind, ctx, scale=0.3, num_splits=num_splits, shared=shared,
                                 shared_splits=shared_splits)
    assert max_rel_err(out, ref) < 1e-5


@pytest.mark.usefixtures("poison")
def test_decode_cascade_bf16():
    groups, ctx_lens, prefix = RUNS[0]
    k_cache, v_cache, table, ctx, shared = run_case(groups, ctx_lens, prefix, hkv=2, d=24, block_size=4,
                                                    dtype=torch.bfloat16)
    q = randn(len(ctx_lens), 6, 24).bfloat16()
    ref = paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), table, ctx, scale=0.3)
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, shared=shared)
    assert out.dtype == torch.bfloat16 and norm_rel_err(out, ref) < 1e-2


def test_decode_cascade_rejects_bad_runs():
    """The reference checks what the kernels rely on (they cannot: no sync); the kernel checks the layout."""
    groups, ctx_lens, prefix = RUNS[0]
    k_cache, v_cache, table, ctx, shared = run_case(groups, ctx_lens, prefix, hkv=1, d=8, block_size=4)
    q = randn(len(ctx_lens), 1, 8)
    for row, claim, match in ((5, (0, 16), "before its last"), (1, (0, 8), "a multiple of 16"),
                              (2, (1, 16), "first row of its run"), (1, (0, 48), "before its last"),
                              (4, (0, 16), "different blocks")):
        bad = shared.clone()
        bad[row] = torch.tensor(claim)
        with pytest.raises(ValueError, match=match):
            paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, scale=1.0, shared=bad)
    for wrong in (shared[:-1], shared.float(), shared[:, :1]):
        with pytest.raises(ValueError, match=r"shared must be int32/int64 \[B"):
            paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=1.0, shared=wrong)
        with pytest.raises(ValueError, match=r"shared must be int32/int64 \[B"):
            paged_decode_attention_reference(q, k_cache, v_cache, table, ctx, scale=1.0, shared=wrong)


def new_tokens(k_cache, v_cache, table, ctx, hq, seed=5):
    """A decode step's unrotated q, k, v (strided slices of one packed projection, as the engine's fused q/k/v
    give them), RoPE tables, and each row's slot: its position `ctx - 1` through its table (-1 for a context 0
    padding row). The caches' entries at those slots become NaN: only a store can fill them."""
    g = torch.Generator().manual_seed(seed)
    rows, (_, bs, hkv, d) = ctx.shape[0], k_cache.shape
    dtype = k_cache.dtype
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=g).to(DEVICE, dtype)
    q, k, v = (x.view(rows, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], 1))
    angles = torch.randn(int(ctx.max()) + 3, d, generator=g)
    cos, sin_signed = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    held = (ctx.long() - 1).clamp(min=0)
    slots = (table.long().gather(1, (held // bs)[:, None])[:, 0] * bs + held % bs).masked_fill(ctx == 0, -1)
    for cache in (k_cache, v_cache):
        cache.view(-1, hkv, d)[slots[slots >= 0]] = float("nan")
    return q, RopeStore(k, v, cos, sin_signed, held, slots)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("hq,hkv,d,bs", [CONFIGS[0], CONFIGS[1], CONFIGS[3]])
@pytest.mark.usefixtures("poison")
def test_decode_with_rope_and_store_equals_rope_store_then_decode(hq, hkv, d, bs, num_splits):
    """Unrotated q and the new K/V handed to the decode kernels: the attention, and the cache after, of
    `rope_store_reference` followed by the reference; a context 0 padding row stores nothing and gives 0."""
    k_cache, v_cache, table, ctx = paged_case([9, 0, 1, 17, 40], hkv=hkv, d=d, block_size=bs)
    q, rope = new_tokens(k_cache, v_cache, table, ctx, hq)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = paged_decode_attention_reference(q, ref_k, ref_v, table, ctx, scale=0.3, rope=rope)
    assert not ref.isnan().any() and not ref[1].any()
    # 16-position tiles: with 3 splits the new position ends a split of its own or shares one
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=num_splits, block_n=16,
                                 rope=rope)
    assert max_rel_err(out, ref) < 1e-5
    torch.testing.assert_close(k_cache, ref_k, equal_nan=True, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_cache, ref_v, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("num_splits,shared_splits", [(1, 2), (3, 1)])
@pytest.mark.usefixtures("poison")
def test_decode_with_rope_and_store_over_shared_prefixes(num_splits, shared_splits):
    """With runs: the run kernel rotates each row's query at the row's own position."""
    groups, ctx_lens, prefix = RUNS[0]
    k_cache, v_cache, table, ctx, shared = run_case(groups, ctx_lens, prefix, hkv=2, d=24, block_size=4)
    q, rope = new_tokens(k_cache, v_cache, table, ctx, 6)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = paged_decode_attention_reference(q, ref_k, ref_v, table, ctx, scale=0.3, shared=shared, rope=rope)
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, num_splits=num_splits, shared=shared,
                                 shared_splits=shared_splits, block_n=16, rope=rope)
    assert max_rel_err(out, ref) < 1e-5
    torch.testing.assert_close(k_cache, ref_k, equal_nan=True, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("poison", "gpu_rounding")
def test_decode_with_rope_and_store_bf16():
    """In 16 bits the rotation rounds as `rope_store` does: the stored keys equal its own, bit for bit."""
    groups, ctx_lens, prefix = RUNS[0]
    k_cache, v_cache, table, ctx, shared = run_case(groups, ctx_lens, prefix, hkv=2, d=24, block_size=4,
                                                    dtype=torch.bfloat16)
    q, rope = new_tokens(k_cache, v_cache, table, ctx, 6)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    rotated = rope_store(q, *rope[:5], ref_k, ref_v, rope.slot_mapping)
    ref = paged_decode_attention(rotated, ref_k, ref_v, table, ctx, scale=0.3, shared=shared)
    out = paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=0.3, shared=shared, rope=rope)
    assert torch.equal(k_cache.isnan(), ref_k.isnan()) and torch.equal(k_cache.nan_to_num(), ref_k.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), ref_v.nan_to_num())
    assert out.dtype == torch.bfloat16 and norm_rel_err(out, ref) < 1e-2


def test_decode_with_rope_rejects_bad_new_tokens():
    k_cache, v_cache, table, ctx = paged_case([5, 9], hkv=2, d=8, block_size=4)
    q, rope = new_tokens(k_cache, v_cache, table, ctx, 4)
    for bad, match in ((rope._replace(positions=rope.positions[:1]), "positions must be"),
                       (rope._replace(k=rope.k[:, :1]), "key and value must both be"),
                       (rope._replace(cos=rope.cos[:, :4]), "tables must both be"),
                       (rope._replace(slot_mapping=rope.slot_mapping.float()), "slot_mapping must be int")):
        with pytest.raises((ValueError, TypeError), match=match):
            paged_decode_attention(q, k_cache, v_cache, table, ctx, scale=1.0, rope=bad)


def test_bench_decode_reference(benchmark):
    k_cache, v_cache, table, ctx = paged_case([200] * 8, hkv=4, d=64, block_size=16)
    q = randn(8, 8, 64)
    benchmark(paged_decode_attention_reference, q, k_cache, v_cache, table, ctx, scale=0.125)


def test_bench_prefill_reference(benchmark):
    k_cache, v_cache, table, ctx = paged_case([200] * 4, hkv=4, d=64, block_size=16)
    qp, cu = packed_queries([64] * 4, 8, 64)
    benchmark(paged_prefill_attention_reference, qp, k_cache, v_cache, table, cu, ctx, scale=0.125)


def strided_queries(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """`q` as a fused qkv projection hands it over: its query heads (a row stride past the K/V heads) with the head
    dim padded (a head stride past D), NaN in between."""
    rows, hq, d = q.shape
    fused = torch.full((rows, hq + 2 * hkv, d + 3), float("nan"), dtype=q.dtype, device=q.device)
    fused[:, :hq, :d] = q
    return fused[:, :hq, :d]


def sliced_table(table: torch.Tensor, free_block: int) -> torch.Tensor:
    """`table` as the leading columns of a wider table (a row stride past its width, unit column stride); the
    columns past it name a free (NaN) block, so a read through the wrong row stride shows."""
    wide = torch.full((table.shape[0], table.shape[1] + 5), free_block, dtype=table.dtype, device=table.device)
    wide[:, :table.shape[1]] = table
    return wide[:, :table.shape[1]]


@pytest.mark.usefixtures("poison")
def test_strided_queries_and_column_sliced_block_tables():
    """Queries whose rows and heads have strides of their own and a block table that is the leading columns of a
    wider one (unit last stride: no copy is made) are read through their strides, in decode and prefill."""
    hq, hkv, d = 6, 2, 24
    k_cache, v_cache, table, ctx = paged_case([5, 17, 9], hkv=hkv, d=d, block_size=4)
    free = min(set(range(k_cache.shape[0])) - set(table.flatten().tolist()))
    q = randn(3, hq, d)
    want = decode_oracle(q, k_cache, v_cache, table, ctx, 0.3)
    for splits in (1, 2):
        out = paged_decode_attention(strided_queries(q, hkv), k_cache, v_cache, sliced_table(table, free), ctx,
                                     scale=0.3, num_splits=splits)
        assert max_rel_err(out, want) < 1e-5
    qp, cu = packed_queries([5, 3, 9], hq, d)
    out = paged_prefill_attention(strided_queries(qp, hkv), k_cache, v_cache, sliced_table(table, free), cu, ctx,
                                  scale=0.3)
    assert max_rel_err(out, sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, 0.3)) < 1e-5


@pytest.mark.usefixtures("poison")
def test_contexts_that_fill_or_exceed_the_block_table():
    """A block table exactly as wide as the longest context (the other tests leave a spare column): that context
    is read to its end. Decode clips a context longer than the table to the table (documented: no sync checks
    it), so row 0 given 23 tokens reads its 16 tabled positions, not the next row's table entries."""
    k_cache, v_cache, table, ctx = paged_case([16, 13], hkv=2, d=16, block_size=4)
    table = table[:, :4].contiguous()  # 4 blocks of 4: row 0 fills them, row 1 uses all 4
    q = randn(2, 4, 16)
    want = decode_oracle(q, k_cache, v_cache, table, ctx, 0.3)
    longer = ctx + torch.tensor([7, 0], dtype=ctx.dtype, device=DEVICE)
    for splits in (1, 3):
        for lens in (ctx, longer):
            out = paged_decode_attention(q, k_cache, v_cache, table, lens, scale=0.3, num_splits=splits)
            assert max_rel_err(out, want) < 1e-5
    qp, cu = packed_queries([16, 4], 4, 16)
    out = paged_prefill_attention(qp, k_cache, v_cache, table, cu, ctx, scale=0.3)
    assert max_rel_err(out, sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, 0.3)) < 1e-5


def strided(t: torch.Tensor, fill: int) -> torch.Tensor:
    """`t` as a view with last stride 2 (every other entry of a wider tensor holding `fill` between)."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.usefixtures("poison")
def test_strided_lengths_and_block_tables():
    """Context lengths, cu_seqlens_q and block tables given as strided views are read by index, not as if
    contiguous (the kernels index them with unit stride)."""
    k_cache, v_cache, table, ctx = paged_case([3, 9, 5], hkv=1, d=16, block_size=4)
    q = randn(3, 2, 16)
    want = decode_oracle(q, k_cache, v_cache, table, ctx, 0.3)
    for t, c in ((table, strided(ctx, 100)), (strided(table, 999), ctx)):
        for splits in (1, 2):
            out = paged_decode_attention(q, k_cache, v_cache, t, c, scale=0.3, num_splits=splits)
            assert max_rel_err(out, want) < 1e-5
    qp, cu = packed_queries([3, 4, 5], 2, 16)
    want = sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, 0.3)
    out = paged_prefill_attention(qp, k_cache, v_cache, strided(table, 999), strided(cu, 0), strided(ctx, 100),
                                  scale=0.3)
    assert max_rel_err(out, want) < 1e-5


def test_prefill_rejects_max_seqlen_q_below_the_longest_query():
    """A `max_seqlen_q` smaller than a sequence's new tokens would size the grid too small and leave the rows past
    the first query tile unwritten: it raises."""
    k_cache, v_cache, table, ctx = paged_case([70], hkv=1, d=16, block_size=16)
    qp, cu = packed_queries([70], 2, 16)
    for short in (1, 69):  # 69: one short is already refused
        with pytest.raises(ValueError, match="max_seqlen_q"):
            paged_prefill_attention(qp, k_cache, v_cache, table, cu, ctx, scale=0.3, max_seqlen_q=short)
    out = paged_prefill_attention(qp, k_cache, v_cache, table, cu, ctx, scale=0.3, max_seqlen_q=70)
    assert max_rel_err(out, sdpa_oracle(qp, k_cache, v_cache, table, cu, ctx, 0.3)) < 1e-5


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.usefixtures("poison")
def test_torch_backend_regathers_rows_that_grew_by_more_than_one_token(monkeypatch, native):
    """The torch backend's decode workspace is reused only while a step's rows are the last step's, each exactly
    one token longer. Rows whose contexts grew more since (positions stored by steps it did not see) are gathered
    again from the paged cache: every step equals the paged reference, with the C++ step and without it."""
    import engine.attention as attention
    from engine.attention import AttentionMetadata, TorchBackend

    if not native:
        monkeypatch.setattr(attention, "_decode_library", lambda: None)
    elif attention._decode_library() is None:
        pytest.skip("no C++ compiler: the decode kernel cannot be built")
    g = torch.Generator().manual_seed(0)
    bs, dim, scale = 4, 16, 0.25
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    kv = torch.randn(2, 1, 8, bs, 1, dim, generator=g)  # every position of the pool is some row's context
    backend = TorchBackend()
    for lens in ([5, 9], [6, 10], [9, 12]):  # the last step comes after steps the backend did not see
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=torch.tensor([t[(c - 1) // bs] * bs + (c - 1) % bs for t, c in
                                                         zip(tables, lens)]),
            context_lens=torch.tensor(lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
            seq_ids=(0, 1), host_context_lens=lens)
        backend.begin_step(kv, meta)
        q, k, v = (torch.randn(2, heads, dim, generator=g) for heads in (2, 1, 1))
        out = backend.forward(0, q, k, v, kv[0, 0], kv[1, 0], meta, scale)
        ref = paged_decode_attention_reference(q, kv[0, 0], kv[1, 0], meta.block_tables, meta.context_lens,
                                               scale=scale)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert backend._tiled == native


@pytest.mark.usefixtures("poison")
def test_torch_backend_native_decode_with_scores_far_apart():
    """The C++ decode step's softmax with scores hundreds apart: a key far above the rest in the first tile of a
    two-tile row (the max must come from every tile, or e^(s - m) overflows), and a head whose scores all lie far
    below 0 in a row whose last tile is partial (the max must skip the lanes past the context, which hold 0, or
    every e^(s - m) hits the exp's floor and the weights go uniform). Equal to the paged reference."""
    import engine.attention as attention
    from engine.attention import AttentionMetadata, TorchBackend

    if attention._decode_library() is None:
        pytest.skip("no C++ compiler: the decode kernel cannot be built")
    g = torch.Generator().manual_seed(1)
    bs, dim, scale, lens = 4, 16, 0.25, [30, 21]
    tables = [list(range(8)), list(range(8, 16))]
    base = F.normalize(torch.randn(dim, generator=g), dim=0)
    kv = torch.full((2, 1, 16, bs, 1, dim), float("nan"))
    keys = [torch.randn(30, dim, generator=g), 5 * base + 0.1 * torch.randn(21, dim, generator=g)]
    keys[0][3] = 10 * base  # row 0, head 0: position 3 scores ~150, the others ~±15
    for row, (table, n) in enumerate(zip(tables, lens)):
        for p in range(n - 1):  # the last position is the step's own token, stored by the step
            kv[0, 0, table[p // bs], p % bs, 0] = keys[row][p]
            kv[1, 0, table[p // bs], p % bs, 0] = torch.randn(dim, generator=g)
    meta = AttentionMetadata(
        is_prefill=False, context_lens=torch.tensor(lens, dtype=torch.int32),
        slot_mapping=torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]),
        block_tables=torch.tensor(tables, dtype=torch.int32), seq_ids=(0, 1), host_context_lens=lens)
    backend = TorchBackend()
    backend.begin_step(kv, meta)
    q = torch.stack([60 * base, -100 * base])[None].expand(2, 2, dim).contiguous()  # head 1, row 1: ~ -125
    k = torch.stack([keys[0][29], keys[1][20]])[:, None]
    out = backend.forward(0, q, k, torch.randn(2, 1, dim, generator=g), kv[0, 0], kv[1, 0], meta, scale)
    assert backend._tiled
    ref = paged_decode_attention_reference(q, kv[0, 0], kv[1, 0], meta.block_tables, meta.context_lens, scale=scale)
    # scores of ~100 carry ~1e-5 of fp32 rounding (the sums' order); what this catches is O(1) or NaN
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
