"""Block manager properties: no leaks, ref counts back to zero, shared blocks never written, forks see the KV
they shared (a simulated cache records who wrote what)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.sequence import Sequence


class SimulatedCache:
    """Per-slot labels standing in for KV, written only where the manager said a row may write."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def apply(self, copies):
        for src, dst in copies:
            assert self.bm.ref_counts[dst] == 1
            self.slots[dst] = list(self.slots[src])

    def write(self, seq: Sequence, start: int, labels: list):
        bs = self.bm.block_size
        for p, label in enumerate(labels, start):
            block = seq.block_table[p // bs]
            assert self.bm.ref_counts[block] == 1, f"row wrote into block {block} shared by others"
            self.slots[block][p % bs] = label

    def read(self, seq: Sequence) -> list:
        bs = self.bm.block_size
        return [self.slots[seq.block_table[p // bs]][p % bs] for p in range(seq.num_cached_tokens)]


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 10_000),
                         st.integers(1, 9)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, block_size=st.integers(1, 5), num_blocks=st.integers(1, 24))
def test_block_manager_never_leaks_never_writes_shared_blocks(ops, block_size, num_blocks):
    bm = BlockManager(num_blocks, block_size)
    cache = SimulatedCache(bm)
    rows: list[tuple[Sequence, list]] = []  # (row, the labels it must read back)
    for step, (op, pick, n) in enumerate(ops):
        if op == "new" or not rows:
            seq = Sequence(list(range(n)))
            if bm.blocks_needed(seq.block_table, 0, n) > bm.num_free_blocks:
                continue
            cache.apply(bm.append(seq, n))
            labels = [(step, p) for p in range(n)]
            cache.write(seq, 0, labels)
            seq.num_cached_tokens = n
            rows.append((seq, labels))
            continue
        seq, labels = rows[pick % len(rows)]
        if op == "append":
            if bm.blocks_needed(seq.block_table, seq.num_cached_tokens, n) > bm.num_free_blocks:
                continue
            cache.apply(bm.append(seq, n))
            new = [(step, p) for p in range(n)]
            cache.write(seq, seq.num_cached_tokens, new)
            seq.num_cached_tokens += n
            labels.extend(new)
        elif op == "fork":
            keep = min(n, seq.num_cached_tokens)
            child = Sequence(list(range(keep)))
            child.block_table = bm.fork(seq.block_table, keep)
            child.num_cached_tokens = keep
            rows.append((child, labels[:keep]))
        else:
            bm.free(seq)
            rows.remove((seq, labels))
        for s, expect in rows:  # nobody's KV was corrupted by anybody else's writes
            assert cache.read(s) == expect
        held = {}
        for s, _ in rows:
            for b in s.block_table:
                held[b] = held.get(b, 0) + 1
        assert all(bm.ref_counts[b] == c for b, c in held.items())
        assert bm.num_free_blocks == num_blocks - len(held)
    for s, _ in rows:
        bm.free(s)
    assert bm.ref_counts == [0] * num_blocks
    assert sorted(bm.free_block_ids) == list(range(num_blocks))


def test_fork_then_write_copies_only_the_partial_block():
    bm = BlockManager(10, 4)
    parent = Sequence(list(range(6)))
    bm.append(parent, 6)
    parent.num_cached_tokens = 6
    children = []
    for _ in range(3):
        c = Sequence(list(range(7)))
        c.block_table = bm.fork(parent.block_table, 6)
        c.num_cached_tokens = 6
        children.append(c)
    bm.free(parent)
    assert bm.num_used_blocks == 2
    copies = [bm.append(c, 1) for c in children]
    # the full block stays shared by all three; two copy the partial block, the last writes it in place
    assert [len(c) for c in copies] == [1, 1, 0]
    assert len({c.block_table[0] for c in children}) == 1
    assert len({c.block_table[1] for c in children}) == 3
    assert bm.num_used_blocks == 4


def test_free_twice_is_an_error():
    bm = BlockManager(2, 2)
    s = Sequence([1, 2])
    bm.append(s, 2)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(s)
