"""Attention over the paged KV cache behind one interface: the torch reference (CPU default), our Triton kernels,
and flash-attn's paged KV path (nano-vllm's choice on GPU).

Every backend stores the step's new K/V through the slot mapping first, then attends: decode rows (one new token
each) through the block tables, prefill rows (new tokens at the end of their context) causally. The step's
metadata travels in one `AttentionMetadata` (nano-vllm's `Context`) so the model code never threads it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from kernels import kv_cache, paged_attention


@dataclass(slots=True)
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [Ntok] int64, -1 = do not store (CUDA-graph padding)
    context_lens: torch.Tensor  # [B] int32: cached tokens per row after this step's store
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] int32, prefill only
    cu_seqlens_k: torch.Tensor | None = None  # [B+1] int32, prefill only (flash-attn's varlen API)
    max_seqlen_q: int = 1
    max_seqlen_k: int = 0


class AttentionBackend:
    """Store + attend. `graph_safe`: no host syncs in decode, so it can be captured in a CUDA graph."""

    name = "base"
    graph_safe = False

    def store(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q `[Ntok, Hq, D]`, k/v `[Ntok, Hkv, D]` of the step's new tokens -> `[Ntok, Hq, D]`."""
        self.store(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_prefill:
            return self.prefill(q, k_cache, v_cache, meta, scale)
        return self.decode(q, k_cache, v_cache, meta, scale)


class TorchBackend(AttentionBackend):
    """The kernels' torch references: exact fp32 softmax, the oracle every other backend is tested against."""

    name = "torch"

    def store(self, key, value, k_cache, v_cache, slot_mapping):
        kv_cache.store_kvcache_reference(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, meta, scale):
        return paged_attention.paged_decode_attention_reference(q, k_cache, v_cache, meta.block_tables,
                                                                meta.context_lens, scale=scale)

    def prefill(self, q, k_cache, v_cache, meta, scale):
        return paged_attention.paged_prefill_attention_reference(q, k_cache, v_cache, meta.block_tables,
                                                                 meta.cu_seqlens_q, meta.context_lens, scale=scale)


class TritonBackend(AttentionBackend):
    """Our Triton paged kernels (split-KV flash-decoding; causal prefill over the cache). Runs on CPU under
    Triton's interpreter, which is only good for tests at tiny shapes."""

    name = "triton"
    graph_safe = True

    def store(self, key, value, k_cache, v_cache, slot_mapping):
        kv_cache.store_kvcache(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, meta, scale):
        return paged_attention.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                      scale=scale)

    def prefill(self, q, k_cache, v_cache, meta, scale):
        return paged_attention.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                                                       meta.context_lens, scale=scale,
                                                       max_seqlen_q=meta.max_seqlen_q)


class FlashAttnBackend(TritonBackend):
    """flash-attn's paged KV (`block_table=`, pages a multiple of 256 tokens), our Triton store."""

    name = "flash_attn"
    graph_safe = True

    def __init__(self):
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen, self._with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache

    def decode(self, q, k_cache, v_cache, meta, scale):
        out = self._with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                 block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)

    def prefill(self, q, k_cache, v_cache, meta, scale):
        # Bottom-right aligned causal mask: the new tokens are the last q_len positions of each context.
        return self._varlen(q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
                            max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k, softmax_scale=scale,
                            causal=True, block_table=meta.block_tables)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_backend(name: str, device: torch.device, block_size: int, dtype: torch.dtype) -> AttentionBackend:
    """`auto`: flash-attn on CUDA when installed, 16-bit and `block_size % 256 == 0`, else Triton on CUDA, else
    torch."""
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if device.type == "cuda":
            name = "flash_attn" if flash_attn_available() and half and block_size % 256 == 0 else "triton"
        else:
            name = "torch"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        return TritonBackend()
    if name == "flash_attn":
        if device.type != "cuda":
            raise ValueError("attention_backend='flash_attn' needs a CUDA device")
        if not flash_attn_available():
            raise ValueError("attention_backend='flash_attn' but flash-attn is not installed (pip install flash-attn)")
        if block_size % 256:
            raise ValueError(f"flash-attn's paged KV needs block_size to be a multiple of 256, got {block_size}")
        if not half:
            raise ValueError(f"flash-attn needs a float16/bfloat16 model, got {dtype}")
        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}")
