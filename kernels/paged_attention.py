"""Attention over a paged KV cache: decode (one new token per sequence) and prefill/extend (new tokens over a prefix).

Cache layout is flash-attn's paged NHD, `[num_blocks, block_size, num_kv_heads, head_dim]`, addressed through a
per-sequence block table; `num_q_heads` is a multiple of `num_kv_heads` (MHA or grouped-query attention).

Decode is flash-decoding: stage 1 runs one program per (sequence, kv head, context split). Each program keeps the whole
query group of that kv head in its tile, so K/V are read once per kv head. It walks its share of the context in
tiles gathered through the block table, with an online softmax in fp32. When there are several splits it writes a
normalised partial output plus its log-sum-exp, and the last of them to finish merges the splits
(`kernels.serial_split`: no second kernel). On a GPU in 16 bits the scores and
P @ V run on the matrix units with 16-bit operands, an MHA query row padded to 16: on an H200 that reads K/V at 0.93
of copy bandwidth, where fp32 tiles reduced with broadcast multiplies reached 0.66-0.71 (same bytes: the upcasts and
cross-thread reductions, presumably, were the limit).

Rows whose block tables start with the same blocks (a group's samples over their prompt; every unconditional CFG
row over the shared pad prefix) can attend those positions once per run instead of once per row (vLLM's and
FlashInfer's cascade attention): `shared` gives each row the first row of its run (at most `SHARED_ROWS`
consecutive rows) and how many leading positions it reads through the run's blocks (`shared_prefixes` builds it
from the tables). A first kernel runs one program per (run, q head, split) with the run's queries as the rows of
one tile, so each shared K/V tile is read once for all of them; each row's own program then walks only its
positions past the shared ones and merges the run's partials by their log-sum-exp. The image phase of a GoT
rollout reads about a quarter fewer K/V bytes per step this way (the unconditional rows' prefix is as long as the
conditional rows' prompt + chain).

A decode step can also hand the kernels its new tokens' unrotated q, k and v (`rope`): they rotate q themselves,
and the one program per (row, KV head) whose range ends the row's context rotates the new k, stores k and v in the
cache and attends the new position from registers. That is what `kernels.rope.rope_store` followed by this op
computes, in one launch fewer per layer.

Prefill/extend runs one program per (query tile, q head, sequence) with a causal mask on absolute positions. The new
tokens' K/V are already in the cache, so a shared cached prefix and the new tokens are read the same way.

By default everything is computed in fp32: tiles are upcast at load, `tl.dot` runs as TF32 for 16-bit inputs (exact
for bf16 and fp16 values, which TF32 represents exactly) and as IEEE fp32 for fp32 inputs. Decode can instead feed
16-bit tiles to the matrix units (fp32 accumulation; `upcast=False`). The softmax is in base 2 with the scale
folded into q (prefill) or applied to the fp32 scores (decode, so q can stay 16-bit).

The torch references are also the engine's CPU attention backend: vectorised gathers, masked fp32 softmax.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, pdl_prologue
from kernels.rope import check_rope_store, rope_rotate, rope_store_reference
from kernels.serial_split import counters, last_to_arrive, reset_count

_LOG2E = 1.4426950408889634
SHARED_ROWS = 16  # rows of one run of a shared prefix: the rows of the run kernel's query tile
SHARED_QUANTUM = 16  # shared positions come in whole 16-position tiles (the CPU kernel's tile)


class RopeStore(NamedTuple):
    """A decode step's new keys and values `[B, Hkv, D]` before RoPE, with what `kernels.rope.rope_store` rotates and
    stores them by: tables `[max_pos, D]`, each row's position `[B]` and cache slot `[B]` (-1: none)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin_signed: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor


def shared_prefixes(tables: list[list[int]], held: list[int], block_size: int) -> list[tuple[int, int]]:
    """Per row, (the first row of its run, how many of its leading positions it reads through the run's blocks):
    a run is up to `SHARED_ROWS` consecutive rows whose block tables start with the same blocks, and a row shares
    the whole `SHARED_QUANTUM`-position tiles that it and the run's first row both hold (`held`: the positions each
    row held before this step) in the same blocks, so the same K/V (shared blocks are never written). The first
    row reads the longest of its run's; a row alone reads 0. The same blocks at the same positions is all it takes:
    a group's samples share their prompt's blocks, unconditional CFG rows the pad prefix's."""
    shared: list[tuple[int, int]] = []
    first = 0
    for row, table in enumerate(tables):
        limit, lead = min(held[row], held[first]), tables[first]
        common = 0
        while common < limit and table[common // block_size] == lead[common // block_size]:
            common += block_size
        common = min(common, limit) // SHARED_QUANTUM * SHARED_QUANTUM
        if row == first or row - first >= SHARED_ROWS or not common:
            first, common = row, 0
        else:
            shared[first] = (first, max(shared[first][1], common))
        shared.append((first, common))
    return shared


# ----------------------------------------------------------------------------------------------------------------
# torch references (also the CPU backend)
# ----------------------------------------------------------------------------------------------------------------

def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q must be [rows, num_q_heads, head_dim={k_cache.shape[-1]}], got {tuple(q.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_q_heads={q.shape[1]} is not a multiple of num_kv_heads={k_cache.shape[2]}")
    if block_tables.dim() != 2 or context_lens.dim() != 1 or block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"block_tables must be [B, max_blocks] and context_lens [B], got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor) -> None:
    _check_cache(q, k_cache, v_cache, block_tables, context_lens)
    if q.shape[0] != context_lens.shape[0]:
        raise ValueError(f"decode takes one query row per sequence: q has {q.shape[0]} rows, context_lens "
                         f"{context_lens.shape[0]}")


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                    max_ctx: int) -> torch.Tensor:
    """`[B, max_ctx, Hkv, D]` copy of each sequence's cached rows, zero past its context."""
    num_blocks, block_size = cache.shape[:2]
    nblk = -(-max_ctx // block_size)
    if nblk > block_tables.shape[1]:
        raise ValueError(f"a context of {max_ctx} tokens needs {nblk} blocks, the block table holds "
                         f"{block_tables.shape[1]}")
    table = block_tables[:, :nblk].long()
    used = torch.arange(nblk, device=table.device) * block_size < context_lens[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        b, j = bad.nonzero()[0].tolist()
        raise IndexError(f"block_tables[{b}, {j}] = {int(table[b, j])} is not a block of the cache "
                         f"({num_blocks} blocks) but lies inside context_lens[{b}] = {int(context_lens[b])}")
    table = torch.where(used, table, 0)
    # index_select, not tensor indexing: the latter is ~1000x slower on CPU with a multi-threaded torch.
    rows = cache.index_select(0, table.reshape(-1)).view(table.shape[0], nblk * block_size, *cache.shape[2:])
    # Slots past a context may hold anything (NaN from an uninitialised cache); 0 keeps them out of p @ V.
    past = torch.arange(nblk * block_size, device=rows.device) >= context_lens[:, None]
    return rows.masked_fill_(past[:, :, None, None], 0)[:, :max_ctx]


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q `[B, M, Hq, D]`, k/v `[B, L, Hkv, D]`, allowed `[B, M, L]` -> `[B, M, Hq, D]` fp32; a row with nothing
    to attend gives 0."""
    bsz, m, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(bsz, m, hkv, hq // hkv, d)
    scores = torch.einsum("bmhgd,blhd->bhgml", qg, k.float()) * scale
    allowed = allowed[:, None, None]
    has_any = allowed.any(-1, keepdim=True)
    # A row with nothing to attend gets a dummy finite softmax, then zero weight (NaNs in the data still show).
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_any, 0.0)
    probs = torch.softmax(scores, dim=-1) * has_any
    out = torch.einsum("bhgml,blhd->bmhgd", probs, v.float())
    return out.reshape(bsz, m, hq, d)


def _check_shared(block_tables: torch.Tensor, context_lens: torch.Tensor, shared: torch.Tensor,
                  block_size: int) -> None:
    """`shared` is what the kernels may rely on: each row's run starts at or before it, fewer than `SHARED_ROWS`
    rows back, at a row that reads at least as far through the same blocks; a row shares only positions before
    its last (its own new token), a multiple of `SHARED_QUANTUM` of them."""
    if shared.shape != (context_lens.shape[0], 2) or shared.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"shared must be int32/int64 [B={context_lens.shape[0]}, 2], got {shared.dtype} "
                         f"{tuple(shared.shape)}")
    lens, tables, runs = context_lens.tolist(), block_tables.tolist(), shared.tolist()
    for row, (first, n) in enumerate(runs):
        if not n:
            continue
        if not (0 <= row - first < SHARED_ROWS and 0 < n < lens[row] and n % SHARED_QUANTUM == 0
                and runs[first][0] == first and runs[first][1] >= n):
            raise ValueError(f"shared[{row}] = ({first}, {n}): a row shares a multiple of {SHARED_QUANTUM} positions "
                             f"before its last with the first row of its run, at most {SHARED_ROWS - 1} rows before "
                             f"it, which reads as far")
        nblk = -(-n // block_size)
        if tables[row][:nblk] != tables[first][:nblk]:
            raise ValueError(f"shared[{row}] = ({first}, {n}) but rows {first} and {row} hold their first {n} "
                             f"positions in different blocks")


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float,
                                     num_splits: int | None = None, shared: torch.Tensor | None = None,
                                     rope: RopeStore | None = None) -> torch.Tensor:
    """Decode attention, torch: q `[B, Hq, D]` attends the first `context_lens[b]` cached tokens of its sequence.

    `num_splits` is accepted for signature parity and ignored; `shared` (see `shared_prefixes`) is checked, and
    changes nothing: sharing is exact. A row with context 0 (CUDA-graph padding) gives 0. With `rope`, q is
    unrotated and the new tokens' K/V not stored yet: `rope_store_reference` first.
    """
    del num_splits
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    if shared is not None:
        _check_shared(block_tables, context_lens, shared, k_cache.shape[1])
    if rope is not None:
        q = rope_store_reference(q, rope.k, rope.v, rope.cos, rope.sin_signed, rope.positions, k_cache, v_cache,
                                 rope.slot_mapping)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    max_ctx = max(int(context_lens.max()), 1)
    k = _gather_context(k_cache, block_tables, context_lens, max_ctx)
    v = _gather_context(v_cache, block_tables, context_lens, max_ctx)
    allowed = (torch.arange(max_ctx, device=q.device) < context_lens[:, None])[:, None]
    return _masked_attention(q[:, None], k, v, allowed, scale)[:, 0].to(q.dtype)


def _check_prefill(q: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Validate the packed layout; returns the per-sequence query lengths (host sync: prefill is not graphed)."""
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] != context_lens.shape[0] + 1:
        raise ValueError(f"cu_seqlens_q must be [B+1] with B={context_lens.shape[0]}, got {tuple(cu_seqlens_q.shape)}")
    if cu_seqlens_q.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens_q must be int32 or int64, got {cu_seqlens_q.dtype}")
    q_lens = cu_seqlens_q.diff()
    first, last = cu_seqlens_q[0].item(), cu_seqlens_q[-1].item()
    if first != 0 or last != q.shape[0] or bool((q_lens < 0).any()):
        raise ValueError(f"cu_seqlens_q must rise from 0 to Ntok={q.shape[0]}, got {cu_seqlens_q.tolist()}")
    short = (context_lens < q_lens).nonzero()
    if short.numel():
        b = int(short[0])
        raise ValueError(f"sequence {b} has {int(q_lens[b])} new tokens but context_lens[{b}] = "
                         f"{int(context_lens[b])}: the new tokens' K/V must already be in the cache")
    return q_lens


def paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                      context_lens: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Causal prefill/extend, torch: the `q_len_b` packed new tokens of sequence b are its last positions of
    `context_lens[b]`, and the token at absolute position p attends cached positions 0..p."""
    _check_cache(q, k_cache, v_cache, block_tables, context_lens)
    q_lens = _check_prefill(q, cu_seqlens_q, context_lens)
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    bsz = context_lens.shape[0]
    max_q, max_ctx = int(q_lens.max()), max(int(context_lens.max()), 1)
    k = _gather_context(k_cache, block_tables, context_lens, max_ctx)
    v = _gather_context(v_cache, block_tables, context_lens, max_ctx)
    # Pad the packed queries to [B, max_q]; row i of sequence b sits at absolute position ctx_b - q_len_b + i.
    rows = torch.arange(max_q, device=q.device)
    row_valid = rows < q_lens[:, None]
    token = (cu_seqlens_q[:-1, None] + rows).clamp(max=max(q.shape[0] - 1, 0))
    qp = q.index_select(0, token.reshape(-1)).view(bsz, max_q, *q.shape[1:])
    pos_q = (context_lens - q_lens)[:, None] + rows
    allowed = torch.arange(max_ctx, device=q.device) <= pos_q[:, :, None]
    allowed &= row_valid[:, :, None]
    res = _masked_attention(qp, k, v, allowed, scale).to(q.dtype).flatten(0, 1)
    keep = row_valid.reshape(-1).nonzero().squeeze(1)
    out.index_copy_(0, token.reshape(-1).index_select(0, keep), res.index_select(0, keep))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _kv_row_offsets(table_row_ptr, pos, valid, BLOCK_SIZE: tl.constexpr, stride_block, stride_slot):
    """Element offsets (int64) of the cache rows holding absolute positions `pos` of one sequence."""
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block * stride_block + (pos % BLOCK_SIZE).to(tl.int64) * stride_slot


@triton.jit
def _softmax_step(scores, m_i, l_i, acc):
    """One online-softmax step in base 2: returns (probabilities, new max, new sum, rescaled acc).

    `scores` may hold -inf (masked); a row that has seen only -inf keeps max -inf and contributes nothing."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _attend(q, k_cache_ptr, v_cache_ptr, table_row, head_off, start, end, row_end, d, d_valid, qk_scale, stride_kb,
            stride_ks, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax of the query tile `q [rows, BLOCK_D]` over positions [start, end) of one sequence's K/V (one
    KV head, through its block table row), each row masked at `row_end [rows]`; returns (max, sum, acc)."""
    m_i = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l_i = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], q.shape[1]], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        valid = pos < end
        rows = _kv_row_offsets(table_row, pos, valid, BLOCK_SIZE, stride_kb, stride_ks) + head_off
        kv_mask = valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        if USE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:  # one query row (MHA): a broadcast-multiply-sum, [1, BLOCK_D] x [BLOCK_N, BLOCK_D]
            scores = tl.sum(q * k, 1)[None, :]
        scores = tl.where(valid[None, :] & (pos[None, :] < row_end[:, None]), scores * qk_scale, float("-inf"))
        p, m_i, l_i, acc = _softmax_step(scores, m_i, l_i, acc)
        if USE_DOT:
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(tl.trans(p) * v, 0)[None, :]
    return m_i, l_i, acc


@triton.jit
def _normalise(m_i, l_i, acc):
    """(output, base-2 log-sum-exp) of an online-softmax state; an empty range gives 0 and -inf, not NaN."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    return out, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))


@triton.jit
def _merge_partial(o_ptr, lse_ptr, m_i, l_i, acc, valid, d_valid):
    """Fold a normalised partial output + its base-2 log-sum-exp into an online-softmax state (m, l, acc): the
    partial is a tile whose max is its LSE and whose sum is 1. `valid`: the rows that have one."""
    lse = tl.load(lse_ptr, mask=valid, other=float("-inf"))
    o = tl.load(o_ptr, mask=valid[:, None] & d_valid[None, :], other=0.0)
    m_new = tl.maximum(m_i, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha, beta = tl.exp2(m_i - m_safe), tl.exp2(lse - m_safe)
    return m_new, l_i * alpha + beta, acc * alpha[:, None] + o * beta[:, None]


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_ptr, shared_ptr, out_ptr, mid_o_ptr, mid_lse_ptr, count_ptr,
    new_k_ptr, new_v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr,
    qk_scale, max_ctx, pool_slots,
    stride_qb, stride_qh, stride_tb, stride_kb, stride_ks, stride_kh, stride_sb,
    stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_cos,
    GROUP: tl.constexpr, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SHARED_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
):
    """A row's context past its shared positions (all of it when `SHARED_SPLITS == 0`); with one split it also
    merges the run kernel's partials of its shared positions (slots `NUM_SPLITS..`), else the (row, KV head)'s last
    program to finish merges every slot (`kernels.serial_split`). With
    `ROPE`, q comes unrotated and the row's new K/V are not in the cache yet: the program whose range ends the
    context rotates and stores them and attends that position from registers (no other program reads it)."""
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.minimum(tl.load(ctx_ptr + b).to(tl.int32), max_ctx)  # never read past the block table
    skip = 0
    if SHARED_SPLITS > 0:
        # a multiple of 16 (`shared_prefixes`): the hint keeps the tiles' block-table reads as aligned as from 0
        skip = tl.multiple_of(tl.minimum(tl.load(shared_ptr + b * stride_sb + 1).to(tl.int32), ctx), 16)
    split_len = tl.cdiv(tl.cdiv(ctx - skip, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = skip + split * split_len
    end = tl.minimum(start + split_len, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + g
    g_valid = g < GROUP
    d_valid = d < HEAD_DIM
    q_rows = q_ptr + b * stride_qb + head[:, None] * stride_qh
    q_mask = g_valid[:, None] & d_valid[None, :]
    q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
    newest = ctx - 1
    cached_end = end
    if ROPE:  # cos and sin' at the row's position: for q here, for the new k below
        swapped = (d + HEAD_DIM // 2) % HEAD_DIM
        table = tl.load(pos_ptr + b).to(tl.int64) * stride_cos
        cos_row = tl.load(cos_ptr + table + d, mask=d_valid, other=0.0).to(tl.float32)
        sin_row = tl.load(sin_ptr + table + d, mask=d_valid, other=0.0).to(tl.float32)
        q = rope_rotate(q, tl.load(q_rows + swapped[None, :], mask=q_mask, other=0.0), cos_row[None, :],
                        sin_row[None, :], q_ptr.dtype.element_ty)
        cached_end = tl.minimum(end, newest)
    if UPCAST:
        q = q.to(tl.float32)
    kv_off = kv_head.to(tl.int64) * stride_kh
    m_i, l_i, acc = _attend(q, k_cache_ptr, v_cache_ptr, table_ptr + b * stride_tb, kv_off, start, cached_end,
                            cached_end + g * 0, d, d_valid, qk_scale, stride_kb, stride_ks, BLOCK_SIZE, BLOCK_N,
                            USE_DOT, DOT_PRECISION, UPCAST)
    if ROPE:
        if (start <= newest) & (newest < end):
            k = rope_rotate(tl.load(new_k_ptr + b * stride_nkb + kv_head * stride_nkh + d, mask=d_valid, other=0.0),
                            tl.load(new_k_ptr + b * stride_nkb + kv_head * stride_nkh + swapped, mask=d_valid,
                                    other=0.0), cos_row, sin_row, k_cache_ptr.dtype.element_ty)
            v = tl.load(new_v_ptr + b * stride_nvb + kv_head * stride_nvh + d, mask=d_valid, other=0.0)
            slot = tl.load(slot_ptr + b).to(tl.int64) + d * 0  # a vector: -1 is padding, out of range dropped
            stored = d_valid & (slot >= 0) & (slot < pool_slots)
            tl.store(k_cache_ptr + slot * stride_ks + kv_off + d, k, mask=stored)
            tl.store(v_cache_ptr + slot * stride_ks + kv_off + d, v.to(v_cache_ptr.dtype.element_ty), mask=stored)
            scores = tl.where(g_valid, tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * qk_scale,
                              float("-inf"))
            p, m_i, l_i, acc = _softmax_step(scores[:, None], m_i, l_i, acc)
            acc += p * v.to(tl.float32)[None, :]

    num_slots: tl.constexpr = NUM_SPLITS + SHARED_SPLITS
    o_mask = g_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        if SHARED_SPLITS > 0:
            run = g_valid & (g * 0 + skip > 0)  # a vector comparison: the interpreter's bool & int1 scalar is int32
            for s in range(SHARED_SPLITS):
                part = (b * NUM_Q_HEADS + head) * num_slots + 1 + s
                m_i, l_i, acc = _merge_partial(mid_o_ptr + part[:, None] * HEAD_DIM + d[None, :], mid_lse_ptr + part,
                                               m_i, l_i, acc, run, d_valid)
        out, _ = _normalise(m_i, l_i, acc)
        tl.store(out_ptr + (b * NUM_Q_HEADS + head[:, None]) * HEAD_DIM + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        out, lse = _normalise(m_i, l_i, acc)
        part = (b * NUM_Q_HEADS + head) * num_slots + split
        tl.store(mid_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=o_mask)
        tl.store(mid_lse_ptr + part, lse, mask=g_valid)
        tile = b * tl.num_programs(1) + kv_head
        if last_to_arrive(count_ptr, tile, NUM_SPLITS):
            shares = False
            if SHARED_SPLITS > 0:
                shares = tl.load(shared_ptr + b * stride_sb + 1) > 0
            for gi in tl.static_range(GROUP):
                _merge_slots(mid_o_ptr, mid_lse_ptr, out_ptr, b * NUM_Q_HEADS + kv_head * GROUP + gi, shares,
                             HEAD_DIM, NUM_SPLITS, SHARED_SPLITS, BLOCK_S, BLOCK_D)
            reset_count(count_ptr, tile)


@triton.jit
def _decode_shared_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, shared_ptr, mid_o_ptr, mid_lse_ptr, cos_ptr, sin_ptr, pos_ptr,
    qk_scale, num_rows, max_ctx,
    stride_qb, stride_qh, stride_tb, stride_kb, stride_ks, stride_kh, stride_sb, stride_cos,
    GROUP: tl.constexpr, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SHARED_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
):
    """One program per (row, q head, split of the shared positions); only a run's first row has work. The run's
    rows (up to BLOCK_R after it) are the rows of the query tile, each masked at its own shared length, and K/V
    come through the first row's block table: each tile is read once for the run. Writes each row's normalised
    partial + LSE to slot `NUM_SPLITS + split`."""
    pdl_prologue(PDL)
    first = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    total = tl.minimum(tl.load(shared_ptr + first.to(tl.int64) * stride_sb + 1).to(tl.int32), max_ctx)
    if (tl.load(shared_ptr + first.to(tl.int64) * stride_sb) != first) | (total <= 0):
        return
    r = first + tl.arange(0, BLOCK_R)
    rows = r.to(tl.int64)
    in_rows = r < num_rows
    n = tl.load(shared_ptr + rows * stride_sb + 1, mask=in_rows, other=0).to(tl.int32)
    member = in_rows & (tl.load(shared_ptr + rows * stride_sb, mask=in_rows, other=-1) == first) & (n > 0)
    n = tl.where(member, n, 0)
    split_len = tl.cdiv(tl.cdiv(total, SHARED_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, total)

    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q_rows = q_ptr + rows[:, None] * stride_qb + head * stride_qh
    q_mask = member[:, None] & d_valid[None, :]
    q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
    if ROPE:  # each row's query rotated at its own position (the shared positions are all cached)
        table = tl.load(pos_ptr + rows, mask=member, other=0).to(tl.int64)[:, None] * stride_cos
        q = rope_rotate(q, tl.load(q_rows + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=q_mask, other=0.0),
                        tl.load(cos_ptr + table + d[None, :], mask=q_mask, other=0.0).to(tl.float32),
                        tl.load(sin_ptr + table + d[None, :], mask=q_mask, other=0.0).to(tl.float32),
                        q_ptr.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)
    m_i, l_i, acc = _attend(q, k_cache_ptr, v_cache_ptr, table_ptr + first.to(tl.int64) * stride_tb,
                            (head // GROUP).to(tl.int64) * stride_kh, start, end, n, d, d_valid, qk_scale, stride_kb,
                            stride_ks, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, UPCAST)
    out, lse = _normalise(m_i, l_i, acc)
    part = (rows * NUM_Q_HEADS + head) * (NUM_SPLITS + SHARED_SPLITS) + NUM_SPLITS + split
    tl.store(mid_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=member[:, None] & d_valid[None, :])
    tl.store(mid_lse_ptr + part, lse, mask=member)


@triton.jit
def _merge_slots(mid_o_ptr, mid_lse_ptr, out_ptr, row, shares, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 SHARED_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the slots of one (sequence, q head): softmax-weighted sum of the partial outputs by their LSE, read
    from L2 (other programs wrote them). The shared-prefix slots count only for a row that `shares` positions (the
    run kernel wrote no others)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    num_slots: tl.constexpr = NUM_SPLITS + SHARED_SPLITS
    s_valid = s < NUM_SPLITS
    if SHARED_SPLITS > 0:
        s_valid = s_valid | ((s < num_slots) & (s * 0 + shares.to(tl.int32) > 0))  # a vector (see above)
    lse = tl.load(mid_lse_ptr + row * num_slots + s, mask=s_valid, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    parts = tl.load(mid_o_ptr + (row * num_slots + s[:, None]) * HEAD_DIM + d[None, :],
                    mask=s_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0, cache_modifier=".cg")
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, cu_q_ptr, ctx_ptr, out_ptr,
    qk_scale,
    stride_qn, stride_qh, stride_tb, stride_kb, stride_ks, stride_kh,
    GROUP: tl.constexpr, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m_tile = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_q_ptr + b).to(tl.int64)
    q_len = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
    if m_tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    pos_q = ctx - q_len + rows
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q_off = (q_start + rows.to(tl.int64))[:, None] * stride_qn + head * stride_qh + d[None, :]
    q_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = table_ptr + b * stride_tb
    head_off = (head // GROUP).to(tl.int64) * stride_kh
    kv_end = tl.minimum(ctx, ctx - q_len + (m_tile + 1) * BLOCK_M)  # causal: the tile's last row sees this far
    for start_n in range(0, kv_end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        kv_rows = _kv_row_offsets(table_row, pos, valid, BLOCK_SIZE, stride_kb, stride_ks) + head_off
        kv_mask = valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        allowed = valid[None, :] & (pos[None, :] <= pos_q[:, None]) & row_valid[:, None]
        scores = tl.where(allowed, scores, float("-inf"))
        p, m_i, l_i, acc = _softmax_step(scores, m_i, l_i, acc)
        acc += tl.dot(p, v, input_precision=DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = (q_start + rows.to(tl.int64))[:, None] * (NUM_Q_HEADS * HEAD_DIM) + head * HEAD_DIM + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _dot_precision(q: torch.Tensor, cache: torch.Tensor) -> str:
    """TF32 is exact on bf16/fp16 values (upcast at load); fp32 operands need IEEE to stay within 1e-5."""
    return "ieee" if torch.float32 in (q.dtype, cache.dtype) else "tf32"


def _check_kernel_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous along head_dim")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` with a unit last stride, as the kernels index the lengths and a block table's row (a copy, captured by
    a CUDA graph, only for a strided view)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _default_num_splits(device: torch.device, programs: int, tiles: int) -> int:
    """Split the context until the grid covers the GPU about twice (flash-decoding); the interpreter wants 1."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // max(programs, 1)), tiles, 16))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, *, scale: float, num_splits: int | None = None,
                           block_n: int = 64, use_dot: bool | None = None, upcast: bool | None = None,
                           shared: torch.Tensor | None = None, shared_splits: int | None = None,
                           rope: RopeStore | None = None) -> torch.Tensor:
    """Decode attention: q `[B, Hq, D]`, one new token per sequence, attends its first `context_lens[b]` cached
    tokens (the current token included) through `block_tables [B, max_blocks]`. Returns `[B, Hq, D]` in q's dtype.

    `num_splits` splits each context for flash-decoding (default: enough programs to fill the GPU). It is fixed by
    host-side shapes, never by `context_lens`, so the call is CUDA-graph safe. A context 0 row gives 0.
    Contexts beyond the block table are clipped to it (no sync to check them); the reference raises instead.
    Launch knobs (`bench kernels --decode-sweep` times them): `block_n` context positions per tile, `use_dot`
    matrix units for the scores and P @ V (with one query head per KV head the query row is padded to 16), `upcast`
    16-bit tiles to fp32 before the dots (off: 16-bit operands, fp32 accumulation, P rounded to 16 bits as
    flash-attention does; only with `use_dot`). Defaults: 16-bit inputs on a GPU take the matrix units with 16-bit
    operands (on an H200 at 32 x 800 tokens 0.90-0.93 of copy bandwidth, against 0.66-0.71 for fp32 tiles with a
    broadcast multiply: `decode_sweep` rows of bench/results/kernels-gpu-h200.json); otherwise fp32 tiles, matrix
    units only for grouped queries (the interpreter's 16-bit dot is broken, fp32 inputs need IEEE dots).
    `shared` `[B, 2]` (`shared_prefixes`; the reference checks it, this does not: no sync) has each run of rows
    read its shared positions once, in `shared_splits` splits (default: as `num_splits`, counting a run per
    `SHARED_ROWS` rows); `shared_splits=0` ignores it.
    `rope` (unrotated q; the new K/V not stored yet) does `kernels.rope.rope_store`'s work inside the same kernels:
    one launch fewer per layer. Each row's slot must be its position `context_lens - 1` in its block table.
    """
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    _check_kernel_inputs(q, k_cache, v_cache)
    if shared is not None and (shared.shape != (q.shape[0], 2) or shared.dtype not in (torch.int32, torch.int64)
                               or shared.device != q.device):
        raise ValueError(f"shared must be int32/int64 [B={q.shape[0]}, 2] on {q.device}, got {shared.dtype} "
                         f"{tuple(shared.shape)} on {shared.device}")
    if rope is not None:
        check_rope_store(q, rope.k, rope.v, rope.cos, rope.sin_signed, rope.positions, k_cache, v_cache,
                         rope.slot_mapping)
    block_tables, context_lens = _unit_stride(block_tables), _unit_stride(context_lens)
    if shared is not None:
        shared = _unit_stride(shared)  # the kernels read a row's length one element after its first row
    bsz, num_q_heads, head_dim = q.shape
    out = torch.empty((bsz, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    max_ctx = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _default_num_splits(q.device, bsz * num_kv_heads, triton.cdiv(max_ctx, block_n))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    sixteen_bit_gpu = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype
    use_dot = (group > 1 or sixteen_bit_gpu) if use_dot is None else use_dot
    upcast = (not sixteen_bit_gpu) if upcast is None else upcast
    if not use_dot and group > 1:
        raise ValueError(f"use_dot=False takes one query head per KV head, got {group}")
    if not (upcast or use_dot):
        raise ValueError("upcast=False needs use_dot=True (the broadcast path multiplies in fp32)")
    if shared is None:
        shared_splits = 0
    elif shared_splits is None:
        shared_splits = _default_num_splits(q.device, -(-bsz // SHARED_ROWS) * num_q_heads,
                                            triton.cdiv(max_ctx, block_n))
    if not isinstance(shared_splits, int) or shared_splits < 0:
        raise ValueError(f"shared_splits must be a non-negative int, got {shared_splits!r}")
    num_slots = num_splits + shared_splits
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_slots > 1:
        mid_o = torch.empty((bsz, num_q_heads, num_slots, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((bsz, num_q_heads, num_slots), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused: stage 1 writes the final output
    if not shared_splits:
        shared = context_lens  # unused
    dot_precision = _dot_precision(q, k_cache)
    strides = (q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
               k_cache.stride(2), shared.stride(0))
    if rope is None:  # unused pointers and strides
        new_k = new_v = cos = sin_signed = q
        positions = slots = context_lens
    else:
        new_k, new_v, cos, sin_signed = rope.k, rope.v, rope.cos, rope.sin_signed
        positions, slots = rope.positions.contiguous(), rope.slot_mapping.contiguous()
    if shared_splits:  # before the rows' own kernel, which merges its partials when it has one split
        _decode_shared_kernel[(bsz, num_q_heads, shared_splits)](
            q, k_cache, v_cache, block_tables, shared, mid_o, mid_lse, cos, sin_signed, positions, scale * _LOG2E,
            bsz, max_ctx, *strides, cos.stride(0),
            GROUP=group, NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
            SHARED_SPLITS=shared_splits, BLOCK_R=SHARED_ROWS, BLOCK_N=block_n, BLOCK_D=block_d,
            DOT_PRECISION=dot_precision, UPCAST=upcast, ROPE=rope is not None, num_warps=4, num_stages=2,
            **pdl_launch(),
        )
    count = counters(q.device, bsz * num_kv_heads) if num_splits > 1 else out  # unused with one split
    _decode_kernel[(bsz, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, shared, out, mid_o, mid_lse, count, new_k, new_v, cos,
        sin_signed, positions, slots, scale * _LOG2E, max_ctx, k_cache.shape[0] * k_cache.shape[1], *strides,
        new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1), cos.stride(0),
        GROUP=group, NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        SHARED_SPLITS=shared_splits, BLOCK_G=max(16, triton.next_power_of_2(group)) if use_dot else 1,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_slots), USE_DOT=use_dot,
        DOT_PRECISION=dot_precision, UPCAST=upcast, ROPE=rope is not None, num_warps=4, num_stages=2,
        **pdl_launch(),
    )
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, *,
                            scale: float, max_seqlen_q: int | None = None) -> torch.Tensor:
    """Causal prefill/extend over the paged cache: q `[Ntok, Hq, D]` packs the new tokens of B sequences
    (`cu_seqlens_q [B+1]`); sequence b's new tokens are the last `q_len_b` of its `context_lens[b]` positions, and
    their K/V are already stored. Covers prefill from scratch (q_len == context) and extension of a cached prefix.

    Validates the layout on the host (one sync; prefill is not graph-captured). `max_seqlen_q`, when the caller
    knows it, only sizes the grid (it must cover the longest query).
    """
    _check_cache(q, k_cache, v_cache, block_tables, context_lens)
    _check_kernel_inputs(q, k_cache, v_cache)
    q_lens = _check_prefill(q, cu_seqlens_q, context_lens)
    block_tables, cu_seqlens_q, context_lens = map(_unit_stride, (block_tables, cu_seqlens_q, context_lens))
    ntok, num_q_heads, head_dim = q.shape
    out = torch.empty((ntok, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if ntok == 0:
        return out
    if int(context_lens.max()) > block_tables.shape[1] * k_cache.shape[1]:
        raise ValueError(f"a context of {int(context_lens.max())} tokens does not fit the block table "
                         f"({block_tables.shape[1]} blocks of {k_cache.shape[1]})")
    longest = int(q_lens.max())
    if max_seqlen_q is None:
        max_seqlen_q = longest
    elif max_seqlen_q < longest:  # the grid would skip the later query tiles, leaving their rows unwritten
        raise ValueError(f"max_seqlen_q={max_seqlen_q} but a sequence has {longest} new tokens")
    block_m = block_n = 32 if head_dim > 64 else 64
    grid = (triton.cdiv(max_seqlen_q, block_m), num_q_heads, context_lens.shape[0])
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_q_heads // k_cache.shape[2], NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), DOT_PRECISION=_dot_precision(q, k_cache),
        num_warps=4, num_stages=2,
    )
    return out

