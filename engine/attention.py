"""Attention over the paged KV cache behind one interface: plain torch (CPU default), our Triton kernels, and
flash-attn's paged KV path (nano-vllm's choice on GPU).

Every backend stores the step's new K/V through the slot mapping first, then attends: decode rows (one new token
each) through the block tables, prefill rows (new tokens at the end of their context) causally. The step's
metadata travels in one `AttentionMetadata` (nano-vllm's `Context`) so the model code never threads it. A decode
step's metadata may carry the runs of rows whose block tables start alike (`shared`, cascade attention): the torch
and Triton backends then read those positions once per run.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from dataclasses import dataclass, field

import torch

from kernels import kv_cache, paged_attention
from kernels.native import F32, I64, P, csrc_library


@dataclass(slots=True)
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [Ntok] int64, -1 = do not store (CUDA-graph padding)
    context_lens: torch.Tensor  # [B] int32: cached tokens per row after this step's store
    block_tables: torch.Tensor | None  # [B, max_blocks] int32; None when the backend said it needs none
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] int32, prefill only
    cu_seqlens_k: torch.Tensor | None = None  # [B+1] int32, prefill only (flash-attn's varlen API)
    max_seqlen_q: int = 1
    max_seqlen_k: int = 0
    seq_ids: tuple[int, ...] = ()  # each row's `Sequence.seq_id`: lets a backend keep per-row state across steps
    host_context_lens: list[int] = field(default_factory=list)  # `context_lens` on the host (no device sync)
    # [B, 2] int32 decode only: each row's run of shared leading blocks (`paged_attention.shared_prefixes`), built
    # with the block tables when the backend `shares_prefixes` and cascade attention is on; else None
    shared: torch.Tensor | None = None


class AttentionBackend:
    """Store + attend. `graph_safe`: no host syncs in decode, so it can be captured in a CUDA graph.
    `triton_store`: its store is `kernels.kv_cache.store_kvcache`, so a caller may store with
    `kernels.rope.rope_store` instead and call `attend` alone. `shares_prefixes`: its decode reads a run's shared
    positions once when the metadata carries `shared`. `fuses_rope_store`: its `decode` also takes the step's
    unrotated q with `rope=` (`kernels.paged_attention.RopeStore`) and does `rope_store`'s work itself."""

    name = "base"
    graph_safe = False
    triton_store = False
    shares_prefixes = False
    fuses_rope_store = False

    def store(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        raise NotImplementedError

    def needs_block_tables(self, first: AttentionMetadata, max_context: int) -> bool:
        """Whether a batch's steps must carry block tables (a multi-step batch's share one), from its first step's
        metadata and the longest context of its last (asked before the tables are built: a flattened table per
        row is the largest part of a decode step's metadata)."""
        return True

    def begin_step(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Once per step, before the layers; `kv_cache` is the whole pool `[K/V, layer, block, slot, head, dim]`."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q `[Ntok, Hq, D]`, k/v `[Ntok, Hkv, D]` of the step's new tokens -> `[Ntok, Hq, D]`."""
        self.store(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(layer, q, k_cache, v_cache, meta, scale)

    def attend(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of the step's queries over the cache, their own K/V stored already."""
        if meta.is_prefill:
            return self.prefill(q, k_cache, v_cache, meta, scale)
        return self.decode(q, k_cache, v_cache, meta, scale)


@functools.cache  # a hot path: no re-hashing of the signatures per call
def _decode_library() -> ctypes.CDLL | None:
    return csrc_library("decode_attention_cpu.cpp", (("gotr1_decode_attention", ctypes.c_int, (
        P, I64, P, I64, P, I64, P, P, P, I64, P, P, P, P, P, I64, I64, I64, I64, I64, F32, P)),))


def _head_rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 `[rows, heads, dim]` whose heads and dims are packed (a row stride of its own is fine)."""
    x = x.float()
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


class TorchBackend(AttentionBackend):
    """Plain torch (the CPU default). Prefill uses the kernels' torch reference (exact fp32 softmax, the oracle
    every backend is tested against). Decode attends through a contiguous fp32 workspace (per layer, keys
    `[row x kv head, dim, position]`, values `[row x kv head, position, dim]`) that persists across steps: while
    the decode rows stay the same sequences, in the same order, each one token longer, a step only writes its
    new K/V into it (the paged cache still gets them too, it stays the source of truth), so a step reads each
    row's context once per layer and copies nothing; a context past the capacity moves the workspace into a
    larger one. Any other step (new rows, a prefill) re-gathers it from the paged cache, all layers at once. A
    workspace larger than the pool itself counted in fp32 (and than `_WORKSPACE_FLOOR`) is not made: such steps
    (a large model on CPU) attend through the reference. Cached positions of a `Sequence` never change while it
    is cached (shared blocks are never written, copy-on-write copies them unchanged), which is what makes the
    reuse exact. Attention itself is two batched matmuls with the query heads of a KV head as the rows, and an
    fp32 softmax; on a CPU with a C++ compiler and a head dim that is a multiple of 16 (up to 256) it is one call
    per layer of csrc/decode_attention_cpu.cpp instead, which also stores the new K/V (keys then tiled by 16
    positions), in the paged cache too when that is fp32.
    """

    name = "torch"
    shares_prefixes = True
    _CAPACITY_STEP = 256  # workspace positions are allocated in multiples of this, with at least this many spare
    _WORKSPACE_FLOOR = 64 * 2**20  # bytes a workspace may always take, whatever the pool's size

    def __init__(self) -> None:
        # [layers, rows * kv heads, head_dim, capacity] fp32 (keys transposed), or [..., capacity / 16, head_dim,
        # 16] for the C++ kernel (`_tiled`)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None  # [layers, rows * kv heads, capacity, head_dim] fp32
        self._tiled = False
        self._scratch: torch.Tensor | None = None  # the C++ kernel's scores, [4 * capacity] fp32
        self._shared: torch.Tensor | None = None  # the C++ kernel's [rows, 2]: first row of the run, shared tiles
        self._seq_ids: tuple[int, ...] = ()  # the rows the workspace holds, in order
        self._lens: list[int] = []  # positions each row holds
        self._position: torch.Tensor | None = None  # this step's new-token position per row x kv head
        self._key_index: torch.Tensor | None = None  # ... as a scatter index into the keys (a view of it)
        self._write: torch.Tensor | None = None  # ... and its flat offset into a layer's values
        self._row_offsets: torch.Tensor | None = None  # where each (row, kv head) starts in a layer's values
        self._mask: torch.Tensor | None = None  # [rows * kv heads, 1, T] additive, None when every row has T
        self._width = 0  # T: this step's longest context
        self.peak_workspace_bytes = 0

    def store(self, key, value, k_cache, v_cache, slot_mapping):
        """`store_kvcache_reference` without its padding filter: this backend is never graph-captured, so every
        slot is a real one (`index_copy_` still rejects any outside the pool)."""
        for src, cache in ((key, k_cache), (value, v_cache)):
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, src.to(cache.dtype))

    def prefill(self, q, k_cache, v_cache, meta, scale):
        return paged_attention.paged_prefill_attention_reference(q, k_cache, v_cache, meta.block_tables,
                                                                 meta.cu_seqlens_q, meta.context_lens, scale=scale)

    # ------------------------------------------------------------------------------------------------ workspace
    def _continues(self, meta: AttentionMetadata) -> bool:
        """The workspace holds this step's rows up to (not including) their new token."""
        return (self._k is not None and meta.seq_ids == self._seq_ids
                and all(c == n + 1 for c, n in zip(meta.host_context_lens, self._lens)))

    def needs_block_tables(self, first, max_context):
        """Only when the workspace does not hold the rows, or some step outgrows it: a larger one may exceed its
        bound, and such steps read the paged cache."""
        return first.is_prefill or not self._continues(first) or max_context > self._v.shape[2]

    def begin_step(self, kv_cache, meta):
        if meta.is_prefill:  # prefill reads the paged cache; the next decode step re-gathers
            self._seq_ids, self._lens = (), []
            return
        heads = kv_cache.shape[4]
        continues = self._continues(meta)
        if not continues or max(meta.host_context_lens) > self._v.shape[2]:  # a new or a larger workspace
            if self._workspace_bytes(kv_cache, meta) > max(kv_cache.numel() * 4, self._WORKSPACE_FLOOR):
                self._k = self._v = None
                self._seq_ids, self._lens = (), []  # too big (a large model on CPU): read the pool each step
                return
            if continues:
                self._grow(meta)
        if continues:  # every row one token longer: its new token goes one position further
            if not self._tiled:
                self._position.add_(1)
                self._write.add_(1)
        else:
            self._k = self._v = None
            self._gather(kv_cache, meta)
            if not self._tiled:  # the new token's position, per row x kv head
                self._position = torch.tensor([c - 1 for c in meta.host_context_lens for _ in range(heads)],
                                              device=kv_cache.device)
                self._key_index = self._position.view(-1, 1, 1).expand(-1, kv_cache.shape[5], 1)
                self._write = self._row_offsets + self._position
        self._lens = lens = meta.host_context_lens
        if self._tiled:  # the kernel reads each row's own length
            return
        self._width = width = max(lens)
        self._mask = None
        if min(lens) != width:
            past = torch.arange(width, device=kv_cache.device) >= meta.context_lens[:, None]
            mask = torch.zeros(past.shape, dtype=torch.float32, device=kv_cache.device).masked_fill_(past, -torch.inf)
            self._mask = mask.repeat_interleave(heads, 0)[:, None]

    def _capacity(self, meta: AttentionMetadata) -> int:
        return (max(meta.host_context_lens) // self._CAPACITY_STEP + 2) * self._CAPACITY_STEP

    def _workspace_bytes(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> int:
        """fp32 K + V of every layer for the step's rows at the capacity a gather would give them."""
        _, layers, _, _, heads, dim = kv_cache.shape
        return 2 * layers * len(meta.host_context_lens) * heads * dim * self._capacity(meta) * 4

    def _gather(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Rebuild the workspace from the paged cache: every row's positions before its new token, all layers."""
        _, layers, _, block_size, heads, dim = kv_cache.shape
        rows, held = len(meta.host_context_lens), [c - 1 for c in meta.host_context_lens]
        capacity = self._capacity(meta)
        dev = kv_cache.device
        self._tiled = dev.type == "cpu" and dim % 16 == 0 and dim <= 256 and _decode_library() is not None
        keys = torch.zeros((layers, rows, heads, dim, capacity), dtype=torch.float32, device=dev)
        values = torch.zeros((layers, rows, heads, capacity, dim), dtype=torch.float32, device=dev)
        longest = max(held)
        if longest:
            nblk = -(-longest // block_size)
            table = meta.block_tables[:, :nblk].long().reshape(-1)
            kv = kv_cache.index_select(2, table).view(2, layers, rows, nblk * block_size, heads, dim)[:, :, :, :longest]
            if min(held) < longest:  # slots past a row's context hold whatever the pool had there: zero them
                past = torch.arange(longest, device=dev) >= torch.tensor(held, device=dev)[:, None]
                kv = kv.masked_fill(past[:, :, None, None], 0)
            keys[..., :longest].copy_(kv[0].permute(0, 1, 3, 4, 2))
            values[:, :, :, :longest].copy_(kv[1].permute(0, 1, 3, 2, 4))
        self._row_offsets = torch.arange(0, rows * heads * capacity, capacity, device=dev)
        if self._tiled:
            tiles = keys.view(layers, rows * heads, dim, capacity // 16, 16).transpose(2, 3)
            self._k = tiles.contiguous()
            self._scratch = torch.empty(4 * capacity, dtype=torch.float32, device=dev)
            shared = [(row, 0) for row in range(rows)] if meta.shared is None else meta.shared.tolist()
            self._shared = torch.tensor([(first, n // 16) for first, n in shared])  # in whole 16-position tiles
        else:
            self._k = keys.view(layers, rows * heads, dim, capacity)
        self._v = values.view(layers, rows * heads, capacity, dim)
        self._seq_ids = meta.seq_ids
        self.peak_workspace_bytes = max(self.peak_workspace_bytes, 2 * keys.numel() * keys.element_size())

    def _grow(self, meta: AttentionMetadata) -> None:
        """Move the workspace into one of the capacity `meta` needs: a copy of what it holds, far cheaper than
        gathering it again."""
        layers, rows_heads, old, dim = self._v.shape
        capacity, dev = self._capacity(meta), self._v.device
        values = torch.zeros((layers, rows_heads, capacity, dim), dtype=torch.float32, device=dev)
        values[:, :, :old] = self._v
        if self._tiled:
            keys = torch.zeros((layers, rows_heads, capacity // 16, dim, 16), dtype=torch.float32, device=dev)
            keys[:, :, :old // 16] = self._k
            self._scratch = torch.empty(4 * capacity, dtype=torch.float32, device=dev)
        else:
            keys = torch.zeros((layers, rows_heads, dim, capacity), dtype=torch.float32, device=dev)
            keys[..., :old] = self._k
            self._row_offsets = torch.arange(0, rows_heads * capacity, capacity, device=dev)
            self._write = self._row_offsets + self._position
        self._k, self._v = keys, values
        self.peak_workspace_bytes = max(self.peak_workspace_bytes, 2 * keys.numel() * keys.element_size())

    def decode(self, q, k_cache, v_cache, meta, scale):
        return paged_attention.paged_decode_attention_reference(q, k_cache, v_cache, meta.block_tables,
                                                                meta.context_lens, scale=scale)

    def forward(self, layer, q, k, v, k_cache, v_cache, meta, scale):
        if meta.is_prefill or self._k is None:
            return super().forward(layer, q, k, v, k_cache, v_cache, meta, scale)
        rows, num_q_heads, dim = q.shape
        kw, vw = self._k[layer], self._v[layer]  # this layer's workspace keys and values
        if self._tiled:
            fp32_cache = k_cache.dtype == torch.float32 and k_cache.is_contiguous() and v_cache.is_contiguous()
            if not fp32_cache:
                self.store(k, v, k_cache, v_cache, meta.slot_mapping)
            qf, kf, vf = _head_rows(q), _head_rows(k), _head_rows(v)
            slots = meta.slot_mapping.to(torch.int64).contiguous()
            lens = meta.context_lens.to(torch.int32).contiguous()
            out = torch.empty((rows, num_q_heads, dim), dtype=torch.float32)
            status = _decode_library().gotr1_decode_attention(
                qf.data_ptr(), qf.stride(0), kf.data_ptr(), kf.stride(0), vf.data_ptr(), vf.stride(0),
                k_cache.data_ptr() if fp32_cache else None, v_cache.data_ptr() if fp32_cache else None,
                slots.data_ptr(), k_cache.shape[0] * k_cache.shape[1], kw.data_ptr(), vw.data_ptr(),
                lens.data_ptr(), self._shared.data_ptr(), out.data_ptr(), rows, k.shape[1],
                num_q_heads // k.shape[1], dim, vw.shape[1], scale, self._scratch.data_ptr())
            if status:
                raise IndexError(f"slot_mapping holds a slot outside the KV pool of {k_cache.shape[0]} blocks")
            return out.to(q.dtype)
        self.store(k, v, k_cache, v_cache, meta.slot_mapping)
        kw.scatter_(2, self._key_index, k.reshape(kw.shape[0], dim, 1).float())
        vw.view(-1, dim).index_copy_(0, self._write, v.reshape(-1, dim).float())
        width = self._width
        qg = (q.float() * scale).view(kw.shape[0], -1, dim)  # [rows * kv heads, query heads per kv head, dim]
        if self._mask is None:
            scores = torch.bmm(qg, kw[:, :, :width])
        else:
            scores = torch.baddbmm(self._mask, qg, kw[:, :, :width])
        out = torch.bmm(torch.softmax(scores, dim=-1), vw[:, :width])
        return out.view(rows, num_q_heads, dim).to(q.dtype)


class TritonBackend(AttentionBackend):
    """Our Triton paged kernels (split-KV flash-decoding; causal prefill over the cache). Runs on CPU under
    Triton's interpreter, which is only good for tests at tiny shapes."""

    name = "triton"
    graph_safe = True
    triton_store = True
    shares_prefixes = True
    fuses_rope_store = True

    def store(self, key, value, k_cache, v_cache, slot_mapping):
        kv_cache.store_kvcache(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, meta, scale, rope=None):
        return paged_attention.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                      scale=scale, shared=meta.shared, rope=rope)

    def prefill(self, q, k_cache, v_cache, meta, scale):
        return paged_attention.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                                                       meta.context_lens, scale=scale,
                                                       max_seqlen_q=meta.max_seqlen_q)


class FlashAttnBackend(TritonBackend):
    """flash-attn's paged KV (`block_table=`, pages a multiple of 256 tokens), our Triton store."""

    name = "flash_attn"
    graph_safe = True
    shares_prefixes = False
    fuses_rope_store = False

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
