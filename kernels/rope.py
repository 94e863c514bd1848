"""Rotary position embedding of a step's packed q and k, in one kernel.

transformers' Llama computes `x * cos + rotate_half(x) * sin` in the activations' dtype, rounding after each op;
the engine's torch path does the same as `x * cos + x[perm] * sin'` (halves swapped, sin's first half negated) on
`cat([q, k])`: five launches per layer, which cost more than their bytes in a GPU decode step. Here one program
per (token, head) reads x, its half-swapped self and its position's cos / sin' rows, and rounds to the output dtype
after each multiply and after the sum, as torch does. Under the interpreter (with the GPU's round-to-nearest) that
is bit-identical to torch in bf16 and fp32; compiled, the multiply-adds may be contracted, and results differ from
torch's by up to an ulp of the output dtype (an H200 showed both).

`rope_store` also takes the step's KV store (`kernels.kv_cache.store_kvcache`) into the same launch: rotated k and
v go straight into the paged cache at the slot mapping, and only q comes back. Attention reads k and v from the
cache anyway, so a layer's RoPE and store are one kernel instead of two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import check_store, store_kvcache_reference
from kernels.pdl import pdl_launch, pdl_prologue


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], -1) * sin_signed


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[N, Hq, D]`, k `[N, Hk, D]`, tables `[max_pos, D]` (sin' = sin with its first half negated), positions
    `[N]` -> rotated (q, k)."""
    cos = cos.index_select(0, positions).unsqueeze(1)
    sin_signed = sin_signed.index_select(0, positions).unsqueeze(1)
    return _rotate(q, cos, sin_signed), _rotate(k, cos, sin_signed)


def rope_store_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin_signed: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`rope_reference`, then k and v stored at `slot_mapping` (-1 skipped); returns the rotated q."""
    q, k = rope_reference(q, k, cos, sin_signed, positions)
    store_kvcache_reference(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_out_ptr, v_out_ptr, slot_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table, num_slots,
                 NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 STORE: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, head): q heads, then k heads, then (STORE) v heads, copied unrotated. With STORE
    the k and v rows go to their cache slot (`k_out`/`v_out` are the caches, rows of `NUM_K_HEADS * HEAD_DIM`)."""
    pdl_prologue(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    valid = d < HEAD_DIM
    dtype = q_out_ptr.dtype.element_ty
    row = t
    if STORE:
        if h >= NUM_Q_HEADS:  # a k or v row goes to its slot: -1 is padding, out of range is dropped
            row = tl.load(slot_ptr + t).to(tl.int64)
            rows = tl.zeros([BLOCK_D], dtype=tl.int64) + row
            valid = valid & (rows >= 0) & (rows < num_slots)
    if h >= NUM_Q_HEADS + NUM_K_HEADS:
        src = v_ptr + t * stride_vt + (h - NUM_Q_HEADS - NUM_K_HEADS) * stride_vh
        dst = v_out_ptr + (row * NUM_K_HEADS + h - NUM_Q_HEADS - NUM_K_HEADS) * HEAD_DIM
        tl.store(dst + d, tl.load(src + d, mask=valid, other=0.0).to(v_out_ptr.dtype.element_ty), mask=valid)
    else:
        swapped = (d + HEAD_DIM // 2) % HEAD_DIM
        table = tl.load(pos_ptr + t).to(tl.int64) * stride_table
        c = tl.load(cos_ptr + table + d, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + table + d, mask=valid, other=0.0).to(tl.float32)
        if h < NUM_Q_HEADS:
            src = q_ptr + t * stride_qt + h * stride_qh
            dst = q_out_ptr + (t * NUM_Q_HEADS + h) * HEAD_DIM
        else:
            src = k_ptr + t * stride_kt + (h - NUM_Q_HEADS) * stride_kh
            dst = k_out_ptr + (row * NUM_K_HEADS + h - NUM_Q_HEADS) * HEAD_DIM
        x = tl.load(src + d, mask=valid, other=0.0)
        xs = tl.load(src + swapped, mask=valid, other=0.0)
        tl.store(dst + d, rope_rotate(x, xs, c, s, dtype), mask=valid)


@triton.jit
def rope_rotate(x, x_swapped, cos, sin_signed, dtype: tl.constexpr):
    """`x cos + rotate_half(x) sin` as torch rounds it in `dtype`: each product rounded, then their sum
    (`x_swapped`: x with its halves swapped; cos and sin' in fp32). Shared by every kernel that rotates."""
    a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
    b = (x_swapped.to(tl.float32) * sin_signed).to(dtype).to(tl.float32)
    return (a + b).to(dtype)


def check_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
               positions: torch.Tensor) -> None:
    """Shapes, dtypes and layouts of a rotation's arguments."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [N, H, D] with equal N and D, got {tuple(q.shape)} and {tuple(k.shape)}")
    dim = q.shape[2]
    if dim % 2 or cos.shape != sin_signed.shape or cos.dim() != 2 or cos.shape[1] != dim:
        raise ValueError(f"tables must both be [max_pos, {dim}] with an even head dim, got {tuple(cos.shape)} and "
                         f"{tuple(sin_signed.shape)}")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 of shape [{q.shape[0]}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if len({q.dtype, k.dtype, cos.dtype, sin_signed.dtype}) != 1:
        raise ValueError(f"q, k and the tables must share a dtype, got {q.dtype}, {k.dtype}, {cos.dtype}, "
                         f"{sin_signed.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1 or not (cos.is_contiguous() and sin_signed.is_contiguous()):
        raise ValueError("q and k must be contiguous along head_dim, the tables contiguous")


def _launch(q, k, v, cos, sin_signed, positions, q_out, k_out, v_out, slots, num_slots: int) -> None:
    store = slots is not None
    if q.shape[0]:
        _rope_kernel[(q.shape[0], q.shape[1] + k.shape[1] * (2 if store else 1))](
            q, k, v, cos, sin_signed, positions.contiguous(), q_out, k_out, v_out,  # read at offset t
            slots.contiguous() if store else positions,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), num_slots,
            NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HEAD_DIM=q.shape[2], STORE=store,
            BLOCK_D=triton.next_power_of_2(q.shape[2]), num_warps=1, **pdl_launch())


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_reference` in one launch; returns new contiguous (q, k). Positions are not range-checked on the
    device (CUDA-graph safe): the caller's positions index its own tables."""
    check_rope(q, k, cos, sin_signed, positions)
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                      device=k.device)
    _launch(q, k, k, cos, sin_signed, positions, q_out, k_out, k_out, None, 0)  # no v heads without a store
    return q_out, k_out


def check_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                     positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """The arguments of `rope_store`, or of a kernel that rotates and stores as it does."""
    check_rope(q, k, cos, sin_signed, positions)
    check_store(k, v, k_cache, v_cache, slot_mapping)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or v.stride(2) != 1:
        raise ValueError("the caches must be contiguous and v contiguous along head_dim")


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
               positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot_mapping: torch.Tensor) -> torch.Tensor:
    """`rope_store_reference` in one launch; returns the rotated q (new, contiguous). The caches are
    `[num_blocks, block_size, num_kv_heads, head_dim]` (contiguous); slots past them are dropped, not written, as
    `store_kvcache` does."""
    check_rope_store(q, k, v, cos, sin_signed, positions, k_cache, v_cache, slot_mapping)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(q, k, v, cos, sin_signed, positions, q_out, k_cache, v_cache, slot_mapping,
            k_cache.shape[0] * k_cache.shape[1])
    return q_out
