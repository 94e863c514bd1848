"""Fixed-shape batches for the judge: length-sorted chunks, left padding to a few buckets, CUDA graphs per bucket.

A GRPO step scores G*N samples x 3 rubrics at once, so the scoring forward runs at few distinct shapes; padding
to buckets makes those shapes repeat across steps, and on GPU each one is captured once as a CUDA graph and
replayed (the forward of a 7B judge at these batch sizes is launch-bound without it). Decoding (R_RI's grounding
answers) likewise: a bucket's decode step is one graph over a static KV cache (`DecodeCaches`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig, StaticCache

DEFAULT_SEQ_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and their midpoints) below `max_batch_size`, then itself:
    a batch pads at most a third of dummy rows."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    out, b = {1}, 2
    while b < max_batch_size:
        out.update((b, b + b // 2))
        b *= 2
    return (*sorted(v for v in out if v < max_batch_size), max_batch_size)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; past the largest, n rounded up to a multiple of the largest (run eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def chunks_by_length(lengths: Sequence[int], max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `max_batch_size`, longest first, so a batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + max_batch_size] for i in range(0, len(order), max_batch_size)]


def plan_batches(lengths: Sequence[int], seq_buckets: Sequence[int],
                 max_batch_size: int) -> list[tuple[list[int], int, int]]:
    """Fixed-shape batches `(indices, length, batch)`: rows grouped by their own length bucket (so a short prompt
    never pads to a long one's bucket), at most `max_batch_size` per batch, the batch size rounded up to a bucket."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(bucket(n, seq_buckets), []).append(i)
    sizes = batch_buckets(max_batch_size)
    plan = []
    for length in sorted(groups, reverse=True):
        members = groups[length]
        for chunk in chunks_by_length([lengths[i] for i in members], max_batch_size):
            plan.append(([members[j] for j in chunk], length, bucket(len(chunk), sizes)))
    return plan


def left_pad(rows: Sequence[Sequence[int]], length: int, batch: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[batch, length]` ids and validity mask; rows right-aligned, rows past `len(rows)` entirely padding."""
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    valid = torch.zeros((batch, length), dtype=torch.bool)
    for r, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {r} has {len(row)} tokens, more than the bucket's {length}")
        if row:
            ids[r, length - len(row):] = torch.as_tensor(row, dtype=torch.long)
            valid[r, length - len(row):] = True
    return ids, valid


def causal_padding_mask(valid: torch.Tensor, past_valid: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, 1, Q, K]` boolean attention mask (True = attend) for left-padded rows.

    Query i sees keys j <= i that are real tokens; a padding query also sees itself, so no row of the softmax is
    empty (an empty row is NaN, and NaN times a zero weight would still poison the real rows). With a KV cache,
    `past_valid` `[B, P]` marks the cached keys, which every new query may see.
    """
    b, q = valid.shape
    idx = torch.arange(q, device=valid.device)
    causal = idx[None, :] <= idx[:, None]
    mask = causal[None] & (valid[:, None, :] | torch.eye(q, dtype=torch.bool, device=valid.device)[None])
    if past_valid is not None:
        mask = torch.cat([past_valid[:, None, :].expand(b, q, -1), mask], dim=-1)
    return mask[:, None]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class GraphedForward:
    """Calls `fn(*tensors) -> Tensor` eagerly, or, when `use_graphs`, through one CUDA graph per input signature
    (shapes and dtypes): captured on first use, replayed after copying the inputs into its static buffers.

    Graphs share one memory pool (they never run concurrently). The result is cloned out of the static output,
    because the next replay overwrites it.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], use_graphs: bool, warmup: int = 2):
        if use_graphs and not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs asked for, but torch sees no CUDA device")
        self.fn, self.use_graphs, self.warmup = fn, use_graphs, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None

    def reset(self) -> None:
        """Drop every graph (their inputs, outputs and pool): the memory they were captured on is going away."""
        self.graphs.clear()
        self.pool = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.use_graphs:
            return self.fn(*inputs)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs)
        for static, new in zip(entry.inputs, inputs):
            static.copy_(new, non_blocking=True)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, inputs: Sequence[torch.Tensor]) -> _Graph:
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy cuBLAS/allocator initialisation
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static)
        self.pool = graph.pool()
        return _Graph(graph, static, output)


class DecodeCaches:
    """transformers `StaticCache`s for fixed-shape greedy decoding, one per (batch, length) shape, all of whose
    keys and values are views of one arena per layer (sized for the largest shape asked for): a shape's decode
    steps can then be one CUDA graph, which holds the addresses of its cache's tensors, without a cache's worth of
    memory per shape. Decoding runs one batch at a time, and each batch fills its cache from position 0, so the
    shapes can share the memory. A shape larger than the arena replaces it: every cache is dropped, and
    `on_grow` is called first (to drop the graphs captured on the old memory)."""

    def __init__(self, config: PreTrainedConfig, dtype: torch.dtype, device: torch.device,
                 on_grow: Callable[[], None]):
        self.config, self.dtype, self.device, self.on_grow = config, dtype, device, on_grow
        self.heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.caches: dict[tuple[int, int], StaticCache] = {}
        self.arena: torch.Tensor | None = None

    def get(self, batch: int, length: int) -> StaticCache:
        """The cache of `batch` rows x `length` positions (made on first use)."""
        cache = self.caches.get((batch, length))
        if cache is not None:
            return cache
        shape = (batch, self.heads, length, self.head_dim)
        numel = batch * self.heads * length * self.head_dim
        if self.arena is None or self.arena.shape[-1] < numel:
            self.on_grow()
            self.caches.clear()
            self.arena = None  # freed before the larger one is made
            # Zeros, not garbage: a masked key still multiplies its value by a zero weight, and 0 * NaN is NaN.
            # Once written, a position holds a real (finite) key and value, which masks hide.
            self.arena = torch.zeros(2, self.config.num_hidden_layers, numel, dtype=self.dtype, device=self.device)
        cache = StaticCache(config=self.config, max_cache_len=length)
        cache.early_initialization(batch, self.heads, self.head_dim, self.dtype, self.device)
        for i, layer in enumerate(cache.layers):
            layer.keys = self.arena[0, i, :numel].view(shape)
            layer.values = self.arena[1, i, :numel].view(shape)
        self.caches[(batch, length)] = cache
        return cache


def seek(cache: StaticCache, position: torch.Tensor | int) -> None:
    """Make every layer of `cache` write its next keys and values at `position` (a device scalar inside a graph)."""
    for layer in cache.layers:
        if isinstance(position, int):
            layer.cumulative_length.fill_(position)
        else:
            layer.cumulative_length.copy_(position)
