"""Write new K/V rows into a paged KV cache through a slot mapping.

Layout (flash-attn's paged NHD): `k_cache`, `v_cache` are `[num_blocks, block_size, num_kv_heads, head_dim]`, and
slot `s = block_id * block_size + offset` names one `[num_kv_heads, head_dim]` row of the flattened cache.
A slot of -1 marks a padding row (CUDA-graph padding, or a token whose KV must not be kept) and is skipped.

One program per token copies its `num_kv_heads * head_dim` values for K and for V; the copy is the whole cost, so
the kernel is a bandwidth-bound gather-free store (no arithmetic, no dtype games beyond the cast to the cache dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def check_store(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Shapes, dtypes and devices of a store's arguments (shared with `kernels.rope.rope_store`)."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [N, num_kv_heads, head_dim], got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key rows {tuple(key.shape[1:])} do not match the cache's (num_kv_heads, head_dim) "
                         f"{tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [N={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def store_kvcache_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> None:
    """Torch reference (and the engine's CPU path): scatter rows with slot >= 0 into the caches, in place."""
    check_store(key, value, k_cache, v_cache, slot_mapping)
    rows = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping.index_select(0, rows).long()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slots.numel() and int(slots.max()) >= num_slots:
        raise IndexError(f"slot {int(slots.max())} is outside the cache ({num_slots} slots)")
    # index_select/index_copy_ rather than boolean or tensor indexing: the latter are ~1000x slower on small CPU
    # tensors with a multi-threaded torch, and this is the engine's CPU path.
    for src, cache in ((key, k_cache), (value, v_cache)):
        cache.view(num_slots, *cache.shape[2:]).index_copy_(0, slots, src.index_select(0, rows).to(cache.dtype))


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh, num_slots,
    HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # -1 is padding; an out-of-range slot is dropped too rather than written outside the cache.
    if (slot < 0) | (slot >= num_slots):
        return
    offs = tl.arange(0, BLOCK)
    valid = offs < ROW
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    k = tl.load(key_ptr + token * stride_kn + head * stride_kh + dim, mask=valid)
    v = tl.load(value_ptr + token * stride_vn + head * stride_vh + dim, mask=valid)
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=valid)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=valid)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Store `key`/`value` `[N, Hkv, D]` at `slot_mapping` `[N]` (int32/int64, -1 = skip) in the caches, in place.

    Slots past the cache are dropped, not written (checking them would need a device sync in the decode loop);
    `store_kvcache_reference` raises on them instead.
    """
    check_store(key, value, k_cache, v_cache, slot_mapping)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value must be contiguous along head_dim")
    n, num_kv_heads, head_dim = key.shape
    if n == 0:
        return
    row = num_kv_heads * head_dim
    _store_kvcache_kernel[(n,)](
        key, value, k_cache, v_cache, slot_mapping.contiguous(),  # the kernel reads slot i at offset i
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), k_cache.shape[0] * k_cache.shape[1],
        HEAD_DIM=head_dim, ROW=row, BLOCK=triton.next_power_of_2(row),
        num_warps=4 if row <= 2048 else 8,
    )
