"""Block manager properties: no leaks, ref counts back to zero, shared blocks never written, forks see the KV
they shared (a simulated cache records who wrote what), every write takes exactly the blocks `blocks_needed` counts."""
import itertools

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


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free", "rewind"]), st.integers(0, 10_000),
                         st.integers(0, 9)), min_size=1, max_size=60)


def blocks_to_write(bm: BlockManager, table: list[int], start: int, n: int) -> int:
    """Oracle, position by position: the blocks holding positions [start, start + n) that are missing or shared."""
    blocks = {p // bm.block_size for p in range(start, start + n)}
    return sum(1 for j in blocks if j >= len(table) or bm.ref_counts[table[j]] > 1)


def checked_append(bm: BlockManager, cache: SimulatedCache, seq: Sequence, n: int) -> None:
    """`append`, asserting that it takes exactly the blocks `blocks_needed` (and the oracle) counted."""
    need, free = blocks_to_write(bm, seq.block_table, seq.num_cached_tokens, n), bm.num_free_blocks
    assert bm.blocks_needed(seq.block_table, seq.num_cached_tokens, n) == need
    cache.apply(bm.append(seq, n))
    assert bm.num_free_blocks == free - need


@settings(max_examples=80, deadline=None)
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
            checked_append(bm, cache, seq, n)
            labels = [(step, p) for p in range(n)]
            cache.write(seq, 0, labels)
            seq.num_cached_tokens = n
            rows.append((seq, labels))
            continue
        seq, labels = rows[pick % len(rows)]
        if op == "append":
            if bm.blocks_needed(seq.block_table, seq.num_cached_tokens, n) > bm.num_free_blocks:
                continue
            checked_append(bm, cache, seq, n)
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
        elif op == "rewind":  # a multi-step window cut short: fewer cached tokens, the blocks ahead kept
            seq.num_cached_tokens = max(0, seq.num_cached_tokens - n)
            del labels[seq.num_cached_tokens:]
        else:
            bm.free(seq)
            assert seq.block_table == [] and seq.num_cached_tokens == 0
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


@pytest.mark.parametrize("block_size", [1, 2, 3, 4])
def test_every_small_write_takes_the_blocks_it_counts(block_size):
    """Exhaustive over small rows (random op sequences rarely hit each corner): a row of `length` tokens, a sibling
    forked at `shared` of them, the row rewound by `back` (a multi-step window cut short: blocks kept ahead of the
    cached tokens), then `n` tokens written by the row or the sibling."""
    for length, n, back in itertools.product(range(10), range(10), (0, 1, 2, 5)):
        for shared, writer in itertools.product(range(length + 1), (0, 1)):
            bm = BlockManager(32, block_size)
            cache = SimulatedCache(bm)
            row, sibling = Sequence(list(range(length))), Sequence(list(range(shared)))
            checked_append(bm, cache, row, length)
            cache.write(row, 0, [("row", p) for p in range(length)])
            row.num_cached_tokens = length
            sibling.block_table = bm.fork(row.block_table, shared)
            sibling.num_cached_tokens = shared
            row.num_cached_tokens = max(0, length - back)
            expect = [[("row", p) for p in range(row.num_cached_tokens)], [("row", p) for p in range(shared)]]
            seq = (row, sibling)[writer]
            checked_append(bm, cache, seq, n)
            new = [("new", p) for p in range(n)]
            cache.write(seq, seq.num_cached_tokens, new)
            seq.num_cached_tokens += n
            expect[writer] += new
            assert [cache.read(row), cache.read(sibling)] == expect
            bm.free(row)
            bm.free(sibling)
            assert bm.ref_counts == [0] * 32 and bm.num_free_blocks == 32


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
    full, partial = children[0].block_table
    copies = [bm.append(c, 1) for c in children]
    # the full block stays shared by all three; two copy the partial block, the last writes it in place
    assert copies == [[(partial, children[0].block_table[1])], [(partial, children[1].block_table[1])], []]
    assert children[2].block_table == [full, partial]
    assert len({c.block_table[0] for c in children}) == 1
    assert len({c.block_table[1] for c in children}) == 3
    assert bm.num_used_blocks == 4


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_trim_returns_exactly_the_blocks_past_the_rows_tokens(block_size):
    """Slots allocated ahead (a multi-step window's) for 9 more positions of a 5-token row: `trim` keeps the
    blocks of the row's 5 tokens, in order, and returns the rest; a block past the tokens that another row
    shares is a bug and refused."""
    bm = BlockManager(20, block_size)
    row = Sequence(list(range(5)))
    bm.append(row, 14)
    table = list(row.block_table)
    keep = bm.blocks_for(5)
    bm.trim(row)
    assert row.block_table == table[:keep] and bm.num_used_blocks == keep
    assert all(bm.ref_counts[b] == 0 for b in table[keep:]) and set(table[keep:]) <= set(bm.free_block_ids)
    bm.trim(row)
    assert row.block_table == table[:keep]
    bm.append(row, 14)
    other = Sequence([0])
    other.block_table = bm.fork(row.block_table, 14)
    with pytest.raises(RuntimeError, match="past the row's tokens is shared"):
        bm.trim(row)


def test_free_twice_is_an_error():
    bm = BlockManager(2, 2)
    s = Sequence([1, 2])
    bm.append(s, 2)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(s)


def test_bad_sizes_overlong_forks_and_short_pools_are_refused():
    for num_blocks, block_size in ((0, 4), (4, 0)):
        with pytest.raises(ValueError, match="at least one block"):
            BlockManager(num_blocks, block_size)
    bm = BlockManager(3, 4)
    parent = Sequence(list(range(5)))
    bm.append(parent, 5)
    parent.num_cached_tokens = 5
    with pytest.raises(ValueError, match="cannot share 9 tokens"):
        bm.fork(parent.block_table, 9)  # 3 blocks of a 2-block row
    child = Sequence(list(range(5)))
    child.block_table = bm.fork(parent.block_table, 5)
    child.num_cached_tokens = 5
    before = (list(bm.ref_counts), list(bm.free_block_ids), list(parent.block_table))
    assert bm.append(child, 0) == []  # writes nothing: takes nothing (not even a copy of the shared partial block)
    # 4 more tokens: a private copy of the shared partial block and a new block, with one block free
    assert bm.blocks_needed(parent.block_table, 5, 4) == 2
    with pytest.raises(RuntimeError, match="append needs 2 free KV blocks, 1 left"):
        bm.append(parent, 4)
    assert (list(bm.ref_counts), list(bm.free_block_ids), list(parent.block_table)) == before  # left untouched
