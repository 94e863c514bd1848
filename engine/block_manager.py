"""Ref-counted KV blocks with explicit sharing (fork) and copy-on-write.

Sharing is decided by the engine, never found by hashing token ids (nano-vllm / vLLM prefix caching): the
engine knows which rows share a prefix — a group's samples share their prompt, every unconditional CFG row
shares the `[BOS, PAD, ...]` prefix — so it forks block tables and no hash is ever computed. A block that more
than one row references is never written: before a row writes into it, the row gets a private copy.
"""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, table: list[int], num_cached: int, num_new: int) -> int:
        """Free blocks that writing positions `[num_cached, num_cached + num_new)` of a row with block table
        `table` takes: new blocks past the table, plus a private copy of each shared block it writes into."""
        if num_new == 1:  # the decode step's case, kept cheap: a new block, a private copy, or nothing
            j = num_cached // self.block_size
            return 1 if j == len(table) or self.ref_counts[table[j]] > 1 else 0
        if num_new <= 0:
            return 0
        first, last = num_cached // self.block_size, (num_cached + num_new - 1) // self.block_size
        shared = sum(1 for j in range(first, min(last + 1, len(table))) if self.ref_counts[table[j]] > 1)
        return shared + max(0, last + 1 - len(table))

    def append(self, seq: Sequence, num_new: int) -> list[tuple[int, int]]:
        """Make positions `[seq.num_cached_tokens, + num_new)` writable; returns the `(src, dst)` block copies
        (copy-on-write) the KV cache must apply before the forward writes. Callers check `blocks_needed` first."""
        table, bs = seq.block_table, self.block_size
        if num_new == 1:  # the decode step's case, kept cheap
            j = seq.num_cached_tokens // bs
            if j == len(table):
                table.append(self._take())
            elif self.ref_counts[table[j]] > 1:
                old = table[j]
                table[j] = self._take()
                self.ref_counts[old] -= 1
                return [(old, table[j])]
            return []
        if num_new <= 0:  # writes nothing, so takes nothing (as `blocks_needed` counts): no copy of a shared block
            return []
        need = self.blocks_needed(table, seq.num_cached_tokens, num_new)
        if need > len(self.free_block_ids):
            raise RuntimeError(f"append needs {need} free KV blocks, {len(self.free_block_ids)} left")
        copies = []
        first, last = seq.num_cached_tokens // bs, (seq.num_cached_tokens + num_new - 1) // bs
        for j in range(first, min(last + 1, len(table))):
            old = table[j]
            if self.ref_counts[old] > 1:
                table[j] = self._take()
                self.ref_counts[old] -= 1
                copies.append((old, table[j]))
        for _ in range(len(table), last + 1):
            table.append(self._take())
        return copies

    def fork(self, table: list[int], num_tokens: int) -> list[int]:
        """A new block table sharing the blocks that hold the first `num_tokens` positions of `table`."""
        n = self.blocks_for(num_tokens)
        if n > len(table):
            raise ValueError(f"cannot share {num_tokens} tokens of a row that has {len(table)} blocks")
        shared = table[:n]
        for b in shared:
            self.ref_counts[b] += 1
        return list(shared)

    def free(self, seq: Sequence) -> None:
        """Drop the row's references; blocks nobody else holds return to the pool. The row's KV is gone."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def trim(self, seq: Sequence) -> None:
        """Return the blocks past the row's last token to the pool: slots a multi-step window allocated ahead for
        steps that did not run (fresh blocks, the row's alone)."""
        keep = self.blocks_for(len(seq))
        for b in seq.block_table[keep:]:
            if self.ref_counts[b] != 1:
                raise RuntimeError(f"block {b} past the row's tokens is shared ({self.ref_counts[b]} references)")
        self._release(seq.block_table[keep:])
        del seq.block_table[keep:]

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds any more return to the pool."""
        for b in reversed(blocks):
            count = self.ref_counts[b] - 1
            if count < 0:
                raise RuntimeError(f"block {b} freed more often than referenced")
            self.ref_counts[b] = count
            if count == 0:
                self.free_block_ids.append(b)

    def _take(self) -> int:
        if not self.free_block_ids:
            raise RuntimeError("out of KV blocks (callers must check blocks_needed first)")
        b = self.free_block_ids.popleft()
        self.ref_counts[b] = 1
        return b
