"""Scheduler properties with a fake model: every request finishes with the same tokens however tight the KV
pool (preemption by recompute never drops or corrupts anything), refs drain to zero, rows only ever read the KV
their own tokens produced, prompt / unconditional-prefix blocks are shared as designed, and requests with
cfg_weight 1 hold no unconditional rows at all. Every fake step also checks the bookkeeping (`check_batch`,
`check_state`, `CheckedScheduler`: exact ref counts, queue order and statuses, batch limits, exact admission plans),
and hand-stepped runs pin the boundaries a mutation review found unpinned (inclusive limits, exact-fit windows and
prefix growth, dropping the prefix at admission, abort at any step). Then the refusal bound through the real
engine at the tiny preset: a request alone fills a pool of exactly its bound and cannot run in one block fewer, and
mixed requests in a pool just above the largest bound sample the tokens of a roomy run."""
import collections
import functools
import itertools
import random
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import NO_IMAGE, Group, Sample, SampleStatus, Sequence, sample_key
from gotr1.model import build_preset

PAD, BOS, BOI = 0, 1, 2


class FakeModel:
    """Stands in for runner + sampler. The 'KV' of position p of a row is its token prefix up to p, written
    through the block tables into a simulated cache and read back for the whole context every step; tokens
    are a deterministic function of the sample and its own history, so they must not depend on scheduling.
    `cuts`: how many steps each window runs before it is interrupted (cycled; None: every window runs whole)."""

    def __init__(self, bm: BlockManager, cuts: list[int] | None = None):
        self.bm = bm
        self.cuts = itertools.cycle(cuts) if cuts else None
        self.slots = [[None] * bm.block_size for _ in range(bm.num_blocks)]
        self.steps = []

    def step(self, sched: Scheduler):
        before = [id(s) for s in sched.running]
        batch = sched.schedule()
        self.steps.append(batch)
        check_batch(sched, batch, before)
        assert [batch.seqs[r] for r in batch.cond_rows] == [s.cond for s in batch.image_samples]
        assert [batch.seqs[r] for r in batch.uncond_rows] == [s.uncond for s in batch.image_samples
                                                              if s.group.guided]
        if not batch.is_prefill:  # unconditional rows last: an image step's heads read one slice
            n = len(batch.seqs)
            assert batch.uncond_rows == list(range(n - len(batch.uncond_rows), n))
        # a multi-step window ends no later than the first image completes or the first forced BOI
        assert batch.num_steps == 1 or not batch.is_prefill
        assert all(batch.num_steps <= s.group.num_image_tokens - s.num_image_tokens for s in batch.image_samples)
        assert all(not s.force_boi(batch.num_steps - 2) for s in batch.text_samples)
        for src, dst in batch.copies:
            self.slots[dst] = list(self.slots[src])
        steps = batch.num_steps if self.cuts is None else min(batch.num_steps, next(self.cuts))
        # Like the engine, the host appends once, after the window's last step: meanwhile each row's tokens so far
        # live here (a text row stops at its `<begin_of_image>`: the window's later steps are waste for it).
        tokens: dict[int, list[int]] = {}
        text = [([], []) for _ in batch.text_samples]  # per sample: tokens, log-probs over the steps
        image = [([], []) for _ in batch.image_samples]
        for step in range(steps):
            self._step(batch, step, tokens, text, image)
        finished = sched.postprocess(batch, [t for t, _ in text], [lp for _, lp in text], [t for t, _ in image],
                                     [lp for _, lp in image], [[x - 1 for x in lp] for _, lp in image])
        if steps < batch.num_steps:
            sched.cut_window(batch)
        check_state(sched, self.bm)
        return finished

    def _step(self, batch, step: int, tokens: dict[int, list[int]], text: list, image: list) -> None:
        bs = self.bm.block_size

        def row(seq: Sequence) -> list[int]:
            return tokens.setdefault(id(seq), list(seq.token_ids))

        for seq, start, q in zip(batch.seqs, batch.starts, batch.query_lens):
            assert q >= 1 and (batch.is_prefill or q == 1)
            own = row(seq)
            for p in range(start + step, start + step + q):
                block = seq.block_table[p // bs]
                assert self.bm.ref_counts[block] == 1, "a shared block was written"
                # past the row's tokens: a text row that sampled BOI earlier in this window (a wasted step)
                self.slots[block][p % bs] = tuple(own[:p + 1]) if p < len(own) else ("wasted", p)
        for seq, start, q in zip(batch.seqs, batch.starts, batch.query_lens):
            own = row(seq)
            if start + step + q <= len(own):
                ctx = [self.slots[seq.block_table[p // bs]][p % bs] for p in range(start + step + q)]
                assert ctx == [tuple(own[:p + 1]) for p in range(start + step + q)], "read foreign KV"
        for s, (toks, lps) in zip(batch.text_samples, text):
            own = row(s.cond)
            rng = random.Random(hash((s.key, tuple(own))))
            tok = BOI if rng.random() < 0.3 else rng.randrange(10, 40)
            if s.force_boi(step):
                tok = BOI
            elif s.suppress_boi(step) and tok == BOI:
                tok = 10
            toks.append(tok)
            lps.append(-float(len(own)))
            if BOI not in toks[:-1]:
                own.append(tok)
        for s, (toks, lps) in zip(batch.image_samples, image):
            own = row(s.cond)
            length = s.cond.image_start
            if s.group.guided:
                assert row(s.uncond) == [BOS] + [PAD] * (length - 2) + own[length - 1:]
            else:
                assert s.uncond is None
            toks.append(random.Random(hash((s.key, tuple(own)))).randrange(64))
            lps.append(-float(len(own)))
            own.append(toks[-1])
            if s.uncond is not None:
                row(s.uncond).append(toks[-1])


def check_state(sched: Scheduler, bm: BlockManager) -> None:
    """Between steps: every block's ref count is the number of live rows that hold it (running samples, the prefix,
    prompts not yet forked), waiting samples hold nothing, statuses match the queues, and the prefix lives only
    while a guided request does."""
    live = [s.cond.block_table for s in sched.running] + [s.uncond.block_table for s in sched.running if s.uncond]
    live += [g.prompt_seq.block_table for g in sched.groups.values() if g.prompt_seq is not None]
    live += [sched.uncond_prefix.block_table] if sched.uncond_prefix is not None else []
    held = collections.Counter(b for table in live for b in table)
    assert bm.num_used_blocks == len(held) and all(bm.ref_counts[b] == n for b, n in held.items())
    assert all(s.status is SampleStatus.RUNNING for s in sched.running)
    for w in sched.waiting:
        for s in w.samples if isinstance(w, Group) else [w]:
            assert s.status is SampleStatus.WAITING and not s.cond.block_table and s.uncond is None
            assert s.group.request_id in sched.groups
    kinds = [isinstance(w, Sample) for w in sched.waiting]  # preempted samples resume before new requests
    assert kinds == sorted(kinds, reverse=True)
    assert sched.uncond_prefix is None or any(g.guided for g in sched.groups.values())


def check_batch(sched: Scheduler, batch, before: list[int]) -> None:
    """A scheduled batch keeps the limits and the order: running samples stay in admission order (new ones last,
    so a preemption victim is the most recently admitted); a prefill exceeds max_num_batched_tokens or (counting
    the running samples' peak rows) max_num_seqs only with one unit (prefix growth, a group's prompt or a resumed
    sample) that runs alone; a decode step takes the running samples in order until the next would pass
    max_num_seqs."""
    running = [id(s) for s in sched.running]
    kept = [i for i in before if i in set(running)]
    assert running[:len(kept)] == kept
    if batch.is_prefill:
        units = len(batch.seqs) - len(batch.uncond_rows)
        assert batch.num_tokens <= sched.max_num_batched_tokens or units == 1
        admitted = {id(s) for s in batch.text_samples + batch.image_samples}
        assert (not admitted or sum(s.peak_rows for s in sched.running) <= sched.max_num_seqs
                or (units == 1 and set(running) == admitted))
        return
    assert len(batch.seqs) <= sched.max_num_seqs
    assert not any(s.awaits_uncond for s in sched.running)  # the prefill step grew the prefix or preempted them
    rows = sorted(zip(batch.text_rows + batch.cond_rows, batch.text_samples + batch.image_samples),
                  key=lambda t: t[0])
    assert [id(s) for _, s in rows] == running[:len(rows)]
    if len(rows) < len(running):
        s = sched.running[len(rows)]
        assert len(batch.seqs) + 1 + (s.uncond is not None) > sched.max_num_seqs


class CheckedScheduler(Scheduler):
    """Checks that `_admission` is exact: admitting an item takes the prefill tokens and free blocks it planned
    (unless it takes the prefix's blocks over), so admission never over- or under-reserves."""

    def _admit(self, item, batch, take_prefix=False):
        _, tokens, blocks = self._admission(item, sys.maxsize)
        free, num_tokens = self.block_manager.num_free_blocks, batch.num_tokens
        super()._admit(item, batch, take_prefix)
        assert batch.num_tokens - num_tokens == tokens
        assert take_prefix or free - self.block_manager.num_free_blocks == blocks


def make_group(rid, prompt_len, n, max_r, min_r, cfg_weight=5.0, *, num_image_tokens, seed):
    rng = random.Random(seed)
    prompt = [BOS] + [rng.randrange(10, 40) for _ in range(prompt_len - 1)]
    params = SamplingParams(n=n, max_reasoning_tokens=max_r, min_reasoning_tokens=min_r, cfg_weight=cfg_weight,
                            seed=seed)
    g = Group(request_id=rid, prompt=f"p{rid}", prompt_ids=prompt, params=params, seed=seed,
              num_image_tokens=num_image_tokens)
    g.samples = [Sample(group=g, index=i, key=sample_key(seed, i), cond=Sequence(list(prompt))) for i in range(n)]
    return g


def make_sched(num_blocks, block_size, **config) -> tuple[CheckedScheduler, BlockManager]:
    bm = BlockManager(num_blocks, block_size)
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **config)
    return CheckedScheduler(config, bm, bos_id=BOS, pad_id=PAD, boi_id=BOI), bm


def outcome(group: Group) -> list[tuple]:
    return [(s.reasoning_ids, s.image_token_ids, s.boi_forced, s.text_logprobs, s.image_logprobs)
            for s in group.samples]


def run(specs, *, num_blocks, block_size, max_num_seqs=64, max_num_batched_tokens=4096, num_image_tokens=4,
        arrivals=None, num_scheduler_steps=1, num_image_scheduler_steps=None, cuts=None):
    sched, bm = make_sched(num_blocks, block_size, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, num_scheduler_steps=num_scheduler_steps,
                           num_image_scheduler_steps=num_image_scheduler_steps)
    model = FakeModel(bm, cuts)
    arrivals = arrivals or [0] * len(specs)
    pending = sorted(range(len(specs)), key=lambda i: arrivals[i])
    done, step = {}, 0
    while pending or sched.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            sched.add(make_group(str(i), *specs[i], num_image_tokens=num_image_tokens, seed=i))
        if sched.has_unfinished():
            for g in model.step(sched):
                done[g.request_id] = g
        step += 1
        assert step < 20_000, "scheduler does not make progress"
    assert bm.ref_counts == [0] * num_blocks and bm.num_free_blocks == num_blocks
    assert sched.uncond_prefix is None and not sched.running and not sched.waiting
    return {rid: outcome(g) for rid, g in done.items()}, sched, model


def start(specs, *, num_blocks, block_size, num_image_tokens, **config):
    """A checked scheduler with every request of `specs` added, and its fake model (for tests that step by hand)."""
    sched, bm = make_sched(num_blocks, block_size, **config)
    for i, spec in enumerate(specs):
        sched.add(make_group(str(i), *spec, num_image_tokens=num_image_tokens, seed=i))
    return sched, bm, FakeModel(bm)


def finish(sched: Scheduler, model: FakeModel, done: dict | None = None) -> dict:
    """Step to the end; the outcome of every request that finishes (and of those in `done`)."""
    done = dict(done or {})
    while sched.has_unfinished():
        done.update((g.request_id, outcome(g)) for g in model.step(sched))
    assert model.bm.num_used_blocks == 0 and sched.uncond_prefix is None and not sched.waiting
    return done


group_spec = st.tuples(st.integers(2, 10), st.integers(1, 4), st.integers(0, 6)).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), st.integers(0, t[2]),
                        st.sampled_from([1.0, 5.0])))


# resumed guided samples charged their two peak rows against max_num_seqs: in the text phase, in the image phase
@example(specs=[(2, 1, 0, 0, 1.0), (2, 3, 1, 1, 5.0)], block_size=1, num_image_tokens=2, spare=0, max_num_seqs=2,
         max_num_batched_tokens=5, arrivals=[1, 0, 0, 0], num_scheduler_steps=1, num_image_scheduler_steps=None,
         cuts=None)
@example(specs=[(2, 1, 0, 0, 1.0), (2, 1, 0, 0, 1.0), (2, 3, 1, 0, 5.0)], block_size=1, num_image_tokens=4, spare=1,
         max_num_seqs=3, max_num_batched_tokens=5, arrivals=[0, 0, 0, 0], num_scheduler_steps=1,
         num_image_scheduler_steps=None, cuts=None)
# prefix growth for a running sample preempts that sample: nothing is admitted beside the growth as if alone
@example(specs=[(2, 1, 0, 0, 1.0), (11, 3, 5, 0, 1.0), (2, 1, 10, 0, 5.0)], block_size=1, num_image_tokens=1, spare=0,
         max_num_seqs=12, max_num_batched_tokens=40, arrivals=[0, 0, 0, 0], num_scheduler_steps=1,
         num_image_scheduler_steps=None, cuts=None)
@settings(max_examples=40, deadline=None)
@given(specs=st.lists(group_spec, min_size=1, max_size=4), block_size=st.sampled_from([1, 2, 3, 4, 8]),
       num_image_tokens=st.integers(1, 6), spare=st.integers(0, 12), max_num_seqs=st.integers(2, 12),
       max_num_batched_tokens=st.integers(1, 40), arrivals=st.lists(st.integers(0, 12), min_size=4, max_size=4),
       num_scheduler_steps=st.sampled_from([1, 2, 3, 16]), num_image_scheduler_steps=st.sampled_from([None, 1, 2, 5]),
       cuts=st.none() | st.lists(st.integers(1, 16), min_size=1, max_size=5))
def test_tight_pool_gives_the_same_tokens_and_drains(specs, block_size, num_image_tokens, spare, max_num_seqs,
                                                     max_num_batched_tokens, arrivals, num_scheduler_steps,
                                                     num_image_scheduler_steps, cuts):
    """Any pool from the least that fits, any arrival order, batch limits and multi-step windows (image-only ones
    bounded apart), whole or interrupted: the tokens of a single-step run on a roomy pool."""
    roomy, _, _ = run(specs, num_blocks=4096, block_size=block_size, num_image_tokens=num_image_tokens)
    bm = BlockManager(1, block_size)
    sched = Scheduler(EngineConfig(block_size=block_size), bm, bos_id=BOS, pad_id=PAD, boi_id=BOI)
    least = max(sched.blocks_to_finish_alone(make_group("x", *s, num_image_tokens=num_image_tokens, seed=0))
                for s in specs)
    tight, sched, _ = run(specs, num_blocks=least + spare, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, num_image_tokens=num_image_tokens,
                          arrivals=arrivals[:len(specs)], num_scheduler_steps=num_scheduler_steps,
                          num_image_scheduler_steps=num_image_scheduler_steps, cuts=cuts)
    assert tight == roomy
    for rid, samples in tight.items():
        n, max_r, min_r = specs[int(rid)][1:4]
        assert len(samples) == n
        for reasoning, image, forced, text_lps, image_lps in samples:
            assert reasoning[-1] == BOI and BOI not in reasoning[:-1]
            assert min_r + 1 <= len(reasoning) <= max_r + 1 and forced == (len(reasoning) == max_r + 1)
            assert len(image) == len(image_lps) == num_image_tokens and len(text_lps) == len(reasoning)


@pytest.mark.parametrize("cfg_weights", [(5.0, 5.0, 5.0), (1.0, 1.0, 1.0), (1.0, 5.0, 1.0)])
def test_preemption_happens_and_resumes_exactly(cfg_weights):
    specs = [(9, 4, 6, 3, cfg_weights[0]), (5, 3, 5, 0, cfg_weights[1]), (7, 4, 6, 6, cfg_weights[2])]
    roomy, _, _ = run(specs, num_blocks=1000, block_size=2)
    tight, sched, model = run(specs, num_blocks=30, block_size=2, arrivals=[0, 1, 3])
    assert sched.num_preemptions > 0
    assert tight == roomy
    assert any(b.is_prefill and b.image_samples for b in model.steps)  # image-phase samples were resumed


def test_prefix_growth_for_a_queued_sample_preempts_no_running_one():
    """In a pool of one guided sample's bound, the four samples of a group reach the image phase together and three
    are preempted, once each: the shared prefix is grown for the one resuming at the head of the queue only into
    free blocks. Growing it by preempting the running sample made the two take turns (9 preemptions here)."""
    spec = (7, 4, 4, 4, 5.0)
    group = make_group("x", *spec, num_image_tokens=12, seed=0)
    sched = Scheduler(EngineConfig(block_size=4, num_kv_blocks=1000), BlockManager(1000, 4), bos_id=BOS, pad_id=PAD,
                      boi_id=BOI)
    roomy, _, _ = run([spec], num_blocks=1000, block_size=4, num_image_tokens=12)
    tight, sched, _ = run([spec], num_blocks=sched.blocks_to_finish_alone(group), block_size=4, num_image_tokens=12)
    assert tight == roomy
    assert sched.num_preemptions == 3


def test_prefix_growth_stops_preempting_once_no_running_sample_waits_for_it():
    """A guided sample (prompt 2, up to 10 reasoning tokens) reaches BOI with nothing to fork in a pool of the
    bound (26 blocks) beside an unguided group of three. Growing the prefix for it preempts the most recently
    admitted sample, which is itself: the growth is then for the queue's head alone and preempts nothing more.
    Preempting on for it used to send a second, running sample back too, and that sample, resuming alone beside
    the prefix, dropped it to be grown again: 3 preemptions, the 12-token prefix computed twice, 72 prefill
    tokens instead of 43."""
    specs = [(2, 1, 0, 0, 1.0), (11, 3, 5, 0, 1.0), (2, 1, 10, 0, 5.0)]
    roomy, _, _ = run(specs, num_blocks=4096, block_size=1, num_image_tokens=1)
    tight, sched, model = run(specs, num_blocks=26, block_size=1, max_num_seqs=12, max_num_batched_tokens=40,
                              num_image_tokens=1)
    assert tight == roomy
    growth = [q for b in model.steps if b.is_prefill for seq, q in zip(b.seqs, b.query_lens)
              if seq.image_start == NO_IMAGE and seq.token_ids[1:] == [PAD] * (len(seq) - 1)]
    assert growth == [12]
    assert sched.num_preemptions == 2
    assert sum(b.num_tokens for b in model.steps if b.is_prefill) == 43


def test_prompt_blocks_are_computed_once_per_group():
    """Prefill allocates the prompt's blocks once; the first decode step of n samples copies only the partial
    last prompt block (n - 1 copies: the last sample writes it in place) and shares the full ones."""
    bm = BlockManager(100, 4)
    sched = CheckedScheduler(EngineConfig(block_size=4, num_kv_blocks=100, num_scheduler_steps=1), bm, bos_id=BOS,
                      pad_id=PAD, boi_id=BOI)
    model = FakeModel(bm)
    sched.add(make_group("g", 10, 4, 6, 6, num_image_tokens=3, seed=0))  # prompt: 2 full blocks + 2 tokens
    model.step(sched)
    assert model.steps[-1].is_prefill and model.steps[-1].num_tokens == 10
    assert bm.num_used_blocks == 3
    samples = sched.groups["g"].samples
    assert all(s.cond.block_table == samples[0].cond.block_table for s in samples)
    assert [bm.ref_counts[b] for b in samples[0].cond.block_table] == [4, 4, 4]
    model.step(sched)
    assert not model.steps[-1].is_prefill and len(model.steps[-1].copies) == 3
    assert bm.num_used_blocks == 3 + 3
    assert len({tuple(s.cond.block_table[:2]) for s in samples}) == 1
    assert len({s.cond.block_table[2] for s in samples}) == 4


@pytest.mark.parametrize("num_image_tokens", [1, 2, 3])
def test_multi_step_windows_end_at_forced_boi_and_complete_images(num_image_tokens):
    """A group in lock-step (4 samples, exactly 6 reasoning tokens) decodes its text in one window that ends with
    the forced BOI, holding at most one block per row past its need, and its 1, 2 or 3 image tokens in another."""
    bm = BlockManager(100, 4)
    sched = CheckedScheduler(EngineConfig(block_size=4, num_kv_blocks=100), bm, bos_id=BOS, pad_id=PAD, boi_id=BOI)
    model = FakeModel(bm)
    group = make_group("g", 10, 4, 6, 6, num_image_tokens=num_image_tokens, seed=0)
    sched.add(group)
    model.step(sched)  # the prompt's prefill samples each first reasoning token
    model.step(sched)
    window = model.steps[-1]
    assert not window.is_prefill and window.num_steps == 6 and len(window.text_samples) == 4
    # positions 10..15 written: the partial prompt block copied for 3 samples, one new block each
    assert bm.num_used_blocks == 3 + 3 + 4
    for s in group.samples:
        assert len(s.reasoning_ids) == 7 and s.reasoning_ids[-1] == BOI and s.boi_forced
        assert s.cond.num_cached_tokens == len(s.cond) - 1 == 16
    while sched.has_unfinished():
        model.step(sched)
    assert [(b.is_prefill, b.num_steps) for b in model.steps[2:]] == [(True, 1), (False, num_image_tokens)]
    assert bm.num_used_blocks == 0


def windows(model: FakeModel) -> list[tuple[str, int, int, int]]:
    """Each step's kind, steps, text samples and image samples."""
    return [("prefill" if b.is_prefill else "decode", b.num_steps, len(b.text_samples), len(b.image_samples))
            for b in model.steps]


@pytest.mark.parametrize("num_image_scheduler_steps,image_windows", [(None, [12]), (5, [5, 5, 2]), (12, [12]),
                                                                     (1, [1] * 12)])
def test_image_only_windows_have_their_own_bound_while_nothing_waits(num_image_scheduler_steps, image_windows):
    """A lock-step guided group (3 reasoning tokens, 12 image tokens) with 4-step windows: its text window is cut
    by the forced BOI, the prefix is grown, then the image-only windows are bounded by `num_image_scheduler_steps`
    alone (None: the images' completion, one window)."""
    spec = (5, 2, 3, 3, 5.0)
    roomy, _, _ = run([spec], num_blocks=100, block_size=4, num_image_tokens=12)
    sched, _, model = start([spec], num_blocks=100, block_size=4, num_image_tokens=12, num_scheduler_steps=4,
                            num_image_scheduler_steps=num_image_scheduler_steps)
    assert finish(sched, model) == roomy
    assert windows(model) == [("prefill", 1, 2, 0), ("decode", 3, 2, 0), ("prefill", 1, 0, 0),
                              *[("decode", k, 0, 2) for k in image_windows]]


def test_image_only_windows_keep_the_text_bound_while_a_request_waits():
    """The same group with a second one waiting for rows (`max_num_seqs` 4): the first group's image windows stay
    at 4 steps, so the queue is looked at every 4 steps; the second, alone, then runs its images in one window."""
    spec = (5, 2, 3, 3, 5.0)
    roomy, _, _ = run([spec, spec], num_blocks=100, block_size=4, num_image_tokens=12)
    sched, _, model = start([spec, spec], num_blocks=100, block_size=4, num_image_tokens=12, num_scheduler_steps=4,
                            max_num_seqs=4)
    assert finish(sched, model) == roomy
    text = [("prefill", 1, 2, 0), ("decode", 3, 2, 0)]
    assert windows(model) == [*text, ("prefill", 1, 0, 0), *[("decode", 4, 0, 2)] * 3, *text, ("decode", 12, 0, 2)]


@pytest.mark.parametrize("num_blocks,image_windows", [(17, [("decode", 12, 0, 2)]),
                                                      (16, [("decode", 4, 0, 2)] * 2 + [("decode", 4, 0, 1)])])
def test_an_image_window_short_of_blocks_falls_back_to_the_text_bound(num_blocks, image_windows):
    """The lock-step group in a pool of 17 blocks has the blocks for the 11 slots per row that its 12-step image
    window allocates ahead; in 16 it does not, and runs 4-step windows instead (not single steps) until one
    sample is preempted."""
    spec = (5, 2, 3, 3, 5.0)
    roomy, _, _ = run([spec], num_blocks=100, block_size=4, num_image_tokens=12)
    sched, _, model = start([spec], num_blocks=num_blocks, block_size=4, num_image_tokens=12, num_scheduler_steps=4)
    assert finish(sched, model) == roomy
    assert windows(model)[3:3 + len(image_windows)] == image_windows


def test_a_cut_window_returns_the_blocks_of_its_unrun_steps():
    """The lock-step group's 12-step image window, interrupted after 2 steps: each row keeps only the blocks of
    its tokens (the other 9 slots' blocks return, for the request whose arrival cut the window), and the rest of
    the run gives the uninterrupted tokens."""
    spec = (5, 2, 3, 3, 5.0)
    roomy, _, _ = run([spec], num_blocks=100, block_size=1, num_image_tokens=12)
    sched, bm, model = start([spec], num_blocks=100, block_size=1, num_image_tokens=12, num_scheduler_steps=4)
    model.cuts = itertools.cycle([16, 16, 16, 2, 16])
    for _ in range(4):
        model.step(sched)
    assert windows(model)[3] == ("decode", 12, 0, 2)
    rows = [seq for s in sched.running for seq in (s.cond, s.uncond)]
    assert all(len(seq.block_table) == len(seq) for seq in rows)  # block size 1: a block per token
    assert bm.num_used_blocks == len(set(b for seq in rows + [sched.uncond_prefix] for b in seq.block_table))
    assert finish(sched, model) == roomy


def test_uncond_prefix_is_computed_once_and_shared_by_every_group():
    bm = BlockManager(400, 4)
    sched = CheckedScheduler(EngineConfig(block_size=4, num_kv_blocks=400, num_scheduler_steps=1), bm, bos_id=BOS,
                      pad_id=PAD, boi_id=BOI)  # single steps: the moment all 7 samples hold pairs is seen
    model = FakeModel(bm)
    sched.add(make_group("a", 9, 3, 5, 5, num_image_tokens=8, seed=1))  # every cond row: 9 + 5 + 1 = 15 tokens
    sched.add(make_group("b", 6, 4, 3, 0, num_image_tokens=8, seed=2))  # shorter rows, reach BOI earlier
    growth, checked = [], False
    while sched.has_unfinished():
        model.step(sched)
        batch = model.steps[-1]
        growth += [(start, q) for seq, start, q in zip(batch.seqs, batch.starts, batch.query_lens)
                   if seq is sched.uncond_prefix]
        pairs = [s for s in sched.running if s.uncond is not None]
        if len(pairs) == 7:  # all samples of both groups in the image phase at once
            prefix = sched.uncond_prefix.block_table
            for s in pairs:
                full = (s.cond.image_start - 1) // 4
                assert s.uncond.block_table[:full] == prefix[:full]
            # each unconditional row owns only the blocks past the shared prefix (at most 3 of its 4 here)
            uncond_own = {b for s in pairs for b in s.uncond.block_table} - set(prefix)
            assert len(uncond_own) <= 7 * 3
            assert all(bm.ref_counts[b] >= 2 for b in prefix[:2])
            checked = True
    assert checked
    # computed once per length: first to group b's longest need (6 + 3), then on to group a's (9 + 5)
    assert growth == [(0, 9), (9, 5)]
    assert bm.num_used_blocks == 0


def test_request_that_can_never_fit_is_refused_clearly():
    bm = BlockManager(10, 4)
    sched = Scheduler(EngineConfig(block_size=4, num_kv_blocks=10), bm, bos_id=BOS, pad_id=PAD, boi_id=BOI)
    with pytest.raises(ValueError, match="can never fit the KV cache"):
        sched.add(make_group("big", 20, 1, 10, 0, num_image_tokens=16, seed=0))
    sched.add(make_group("ok", 3, 1, 2, 0, num_image_tokens=3, seed=0))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make_group("ok", 3, 1, 2, 0, num_image_tokens=3, seed=0))


def test_abort_frees_everything_at_any_point():
    for abort_at in range(0, 12):
        bm = BlockManager(200, 2)
        sched = CheckedScheduler(EngineConfig(block_size=2, num_kv_blocks=200), bm, bos_id=BOS, pad_id=PAD, boi_id=BOI)
        model = FakeModel(bm)
        sched.add(make_group("a", 5, 3, 4, 0, num_image_tokens=4, seed=1))
        sched.add(make_group("b", 7, 2, 4, 2, num_image_tokens=4, seed=2))
        for _ in range(abort_at):
            if sched.has_unfinished():
                model.step(sched)
        if "a" in sched.groups:
            sched.abort("a")
        with pytest.raises(KeyError):
            sched.abort("a")
        while sched.has_unfinished():
            model.step(sched)
        assert bm.num_used_blocks == 0 and bm.ref_counts == [0] * 200


def test_cfg_weight_1_takes_no_uncond_rows_prefix_or_blocks():
    """An unguided request (cfg_weight 1) holds only its conditional rows: at every step the blocks in use are
    exactly those of its prompt and conditional rows, with no unconditional prefix, and it needs only one row's
    blocks to finish alone."""
    bm = BlockManager(400, 4)
    sched = CheckedScheduler(EngineConfig(block_size=4, num_kv_blocks=400), bm, bos_id=BOS, pad_id=PAD, boi_id=BOI)
    model = FakeModel(bm)
    group = make_group("u", 10, 4, 6, 2, 1.0, num_image_tokens=8, seed=3)  # rows up to 10 + 6 + 1 + 8 = 25 tokens
    assert sched.blocks_to_finish_alone(group) == 6  # the last image token is never fed: 24 positions of KV
    # guided: the two rows at their end, and nothing for the shared prefix on top
    assert sched.blocks_to_finish_alone(make_group("g", 10, 4, 6, 2, num_image_tokens=8, seed=3)) == 2 * 6
    sched.add(group)
    image_rows = 0
    while sched.has_unfinished():
        model.step(sched)
        batch = model.steps[-1]
        assert sched.uncond_prefix is None and not batch.uncond_rows
        assert all(s.uncond is None for s in group.samples)
        held = {b for s in group.samples for b in s.cond.block_table}
        held |= set(group.prompt_seq.block_table) if group.prompt_seq is not None else set()
        assert bm.num_used_blocks == len(held)
        image_rows += len(batch.image_samples) * batch.num_steps
    assert image_rows == 4 * 8 and bm.num_used_blocks == 0
    with pytest.raises(ValueError, match=r"image tokens\), the pool has 10"):  # no unconditional rows named
        Scheduler(EngineConfig(block_size=4, num_kv_blocks=10), BlockManager(10, 4), bos_id=BOS, pad_id=PAD,
                  boi_id=BOI).add(make_group("big", 20, 1, 10, 0, 1.0, num_image_tokens=16, seed=0))


@pytest.mark.parametrize("cfg_weight,admitted", [(1.0, ["a", "b"]), (5.0, ["a"])])
def test_max_num_seqs_counts_uncond_rows_only_for_guided_requests(cfg_weight, admitted):
    """Admission reserves each sample's peak rows: 2 with CFG, 1 at cfg_weight 1, so two groups of 2 samples fit
    max_num_seqs=4 together only when unguided."""
    bm = BlockManager(200, 4)
    sched = CheckedScheduler(EngineConfig(block_size=4, num_kv_blocks=200, max_num_seqs=4), bm, bos_id=BOS, pad_id=PAD,
                      boi_id=BOI)
    model = FakeModel(bm)
    for rid in ("a", "b"):
        sched.add(make_group(rid, 5, 2, 3, 3, cfg_weight, num_image_tokens=4, seed=ord(rid)))
    model.step(sched)
    assert [g.request_id for g in model.steps[0].prefilled_groups] == admitted
    while sched.has_unfinished():
        model.step(sched)
    assert max(len(b.seqs) for b in model.steps if not b.is_prefill) == 4  # both groups decode at once


def test_uncond_prefix_lives_only_while_a_guided_request_does():
    """The prefix is built for the guided request and dropped when it finishes, while the unguided one still runs."""
    bm = BlockManager(400, 4)
    sched = CheckedScheduler(EngineConfig(block_size=4, num_kv_blocks=400), bm, bos_id=BOS, pad_id=PAD, boi_id=BOI)
    model = FakeModel(bm)
    sched.add(make_group("u", 6, 2, 8, 8, 1.0, num_image_tokens=12, seed=1))  # long: finishes last
    sched.add(make_group("g", 6, 2, 2, 2, 5.0, num_image_tokens=3, seed=2))
    had_prefix = checked = False
    while sched.has_unfinished():
        finished = [g.request_id for g in model.step(sched)]
        had_prefix |= sched.uncond_prefix is not None
        if finished == ["g"]:
            assert sched.uncond_prefix is None and "u" in sched.groups
            assert bm.num_used_blocks == len({b for s in sched.groups["u"].samples for b in s.cond.block_table})
            checked = True
    assert had_prefix and checked and bm.num_used_blocks == 0


def test_preempting_a_sharer_unshares_the_block_a_sample_was_to_copy():
    """A one-block pool that holds one unguided sample (prompt 2 + BOI + 1 image token): the first decode step's
    sample would copy the prompt block it shares with its sibling, but preempting the sibling leaves it the
    block's only holder, so it writes in place (the need is asked again after each preemption)."""
    spec = (2, 2, 0, 0, 1.0)
    roomy, _, _ = run([spec], num_blocks=100, block_size=4, num_image_tokens=1)
    tight, sched, _ = run([spec], num_blocks=1, block_size=4, num_image_tokens=1)
    assert tight == roomy and sched.num_preemptions > 0


@pytest.mark.parametrize("cfg_weight,num_blocks", [(1.0, 1), (5.0, 2)])
def test_a_row_ending_one_past_a_block_boundary_fits(cfg_weight, num_blocks):
    """Prompt 2 + 1 reasoning token + BOI + 1 image token is 5 tokens, but the last image token is sampled and
    never fed: each row's KV is 4 positions, one block of 4 (the unconditional prefix, 3 positions, lends its
    block to the unconditional row). Such a pool is accepted, not refused as one that can never fit, and runs
    the request to its end."""
    spec = (2, 2, 1, 0, cfg_weight)
    sched = Scheduler(EngineConfig(block_size=4), BlockManager(num_blocks, 4), bos_id=BOS, pad_id=PAD, boi_id=BOI)
    assert sched.blocks_to_finish_alone(make_group("x", *spec, num_image_tokens=1, seed=0)) == num_blocks
    roomy, _, _ = run([spec], num_blocks=100, block_size=4, num_image_tokens=1)
    tight, _, _ = run([spec], num_blocks=num_blocks, block_size=4, num_image_tokens=1)
    assert tight == roomy


def test_a_window_that_needs_exactly_the_free_blocks_runs_whole():
    """The lock-step group above in a pool of its bound (10 blocks): after its first decode step 4 blocks are free,
    exactly what the window's slots take (one new block per sample), so the 6-step window still runs."""
    spec = (10, 4, 6, 6, 5.0)
    roomy, _, _ = run([spec], num_blocks=100, block_size=4, num_image_tokens=3)
    sched, bm, model = start([spec], num_blocks=10, block_size=4, num_image_tokens=3)
    model.step(sched)
    assert bm.num_free_blocks == 7  # 3 prompt blocks
    model.step(sched)
    assert model.steps[-1].num_steps == 6 and bm.num_free_blocks == 0
    assert finish(sched, model) == roomy


def test_a_guided_request_finishing_keeps_the_prefix_for_another():
    """The prefix is grown to 4 for request 1 (prompt 4, no reasoning), which finishes while request 0 still
    reasons; request 0 then grows the same prefix on from 4 to 10, it is not recomputed from 0."""
    sched, _, model = start([(4, 1, 6, 6, 5.0), (4, 1, 0, 0, 5.0)], num_blocks=100, block_size=4,
                            num_image_tokens=2, num_scheduler_steps=1)
    growth, done = [], set()
    while sched.has_unfinished():
        done |= {g.request_id for g in model.step(sched)}
        batch = model.steps[-1]
        growth += [(pos, q, sorted(done)) for seq, pos, q in zip(batch.seqs, batch.starts, batch.query_lens)
                   if seq is sched.uncond_prefix]
    assert growth == [(0, 4, []), (4, 6, ["1"])]


def test_prefix_growth_for_a_queued_sample_takes_exactly_the_free_blocks():
    """A guided sample preempted right after sampling BOI (forced here) waits at the head of the queue for a
    prefix (4 blocks) while an unguided request runs and 4 blocks are free: the prefix is grown at once into
    exactly those blocks, preempting nothing, not only once the unguided request has freed more."""
    specs = [(2, 1, 2, 2, 5.0), (6, 1, 1, 1, 1.0)]
    roomy, _, _ = run(specs, num_blocks=100, block_size=1, num_image_tokens=2)
    sched, bm, model = start(specs, num_blocks=12, block_size=1, num_image_tokens=2, num_scheduler_steps=1)
    g = sched.groups["0"].samples[0]
    while not g.in_image_phase:
        model.step(sched)
    assert sched.uncond_prefix is None and sched.num_preemptions == 0
    sched._preempt(g)
    assert bm.num_free_blocks == 4
    model.step(sched)
    batch = model.steps[-1]
    assert batch.is_prefill and batch.seqs == [sched.uncond_prefix] and batch.query_lens == [4]
    assert bm.num_free_blocks == 0 and sched.num_preemptions == 1 and sched.running
    assert finish(sched, model) == roomy


def test_a_sample_resuming_alone_beside_a_prefix_it_does_not_fit_drops_the_prefix():
    """An unguided sample preempted with 9 of its 10 tokens' KV (forced here: pressure from a newer request would
    do the same) resumes alone in a 10-block pool while the shared prefix (2 blocks) is kept for a queued guided
    request: it cannot fit beside the prefix, so the prefix is dropped (and recomputed for the guided request
    later) and the sample is admitted in the same step."""
    specs = [(2, 1, 0, 0, 5.0), (2, 1, 6, 6, 1.0), (2, 1, 0, 0, 5.0)]  # guided, unguided (long), guided
    roomy, _, _ = run(specs, num_blocks=100, block_size=1, num_image_tokens=2)
    sched, bm, model = start(specs, num_blocks=10, block_size=1, num_image_tokens=2, num_scheduler_steps=1)
    u = sched.groups["1"].samples[0]
    done = {}
    while len(u.cond) < 9 or u.status is not SampleStatus.RUNNING:
        done.update((g.request_id, outcome(g)) for g in model.step(sched))
    assert list(done) == ["0"] and len(sched.uncond_prefix.block_table) == 2
    assert sched.running == [u] and list(sched.waiting) == [sched.groups["2"]] and bm.num_free_blocks == 0
    sched._preempt(u)
    model.step(sched)
    batch = model.steps[-1]
    assert batch.is_prefill and batch.seqs == [u.cond] and sched.uncond_prefix is None
    assert finish(sched, model, done) == roomy


def test_a_prefix_dropped_at_admission_is_not_forked_later_in_the_step():
    """A queue built by hand (reachable only through a long chain of preemptions): first an unguided sample with 29
    tokens, then a guided sample that sampled BOI right after its 2-token prompt and for which the prefix was just
    grown to 12 tokens (its request's longest need). In a 40-block pool the first cannot fit beside the prefix: the
    prefix is dropped and the sample admitted; the guided sample behind it fits the blocks left but must wait for
    the prefix to be grown again, not fork the one just dropped."""
    specs = [(2, 1, 10, 0, 5.0), (2, 1, 30, 30, 1.0)]
    sched, bm, model = start(specs, num_blocks=40, block_size=1, num_image_tokens=1, num_scheduler_steps=1)
    (y,), (x,) = sched.groups["0"].samples, sched.groups["1"].samples
    y.cond.token_ids.append(BOI)
    y.cond.image_start = len(y.cond)
    x.cond.token_ids += [10] * 27
    sched.waiting = collections.deque([y])
    model.step(sched)  # the prefix alone, for y at the head of the queue
    assert model.steps[-1].seqs == [sched.uncond_prefix] and len(sched.uncond_prefix) == 12
    sched.waiting.appendleft(x)
    model.step(sched)
    assert model.steps[-1].seqs == [x.cond] and sched.uncond_prefix is None and list(sched.waiting) == [y]
    finish(sched, model)
    assert x.reasoning_ids[:27] == [10] * 27 and len(x.reasoning_ids) == 31 and len(y.image_token_ids) == 1


@pytest.mark.parametrize("cfg_weight,num_blocks,admitted", [(1.0, 4, ["0", "1"]), (1.0, 3, ["0"]),
                                                            (5.0, 6, ["0", "1"]), (5.0, 5, ["0"])])
def test_admission_keeps_a_free_block_per_peak_row(cfg_weight, num_blocks, admitted):
    """Beside its prompt's blocks, admission keeps one free block for each peak row running or admitted (each may
    need a new block at its next decode step): after request 0 (a one-block prompt, one sample) request 1, the
    same, needs 1 + 2 free blocks unguided, 1 + 4 guided; the bound is inclusive."""
    sched, _, model = start([(4, 1, 0, 0, cfg_weight)] * 2, num_blocks=num_blocks, block_size=4, num_image_tokens=2)
    model.step(sched)
    assert [g.request_id for g in model.steps[0].prefilled_groups] == admitted


@pytest.mark.parametrize("max_num_batched_tokens,admitted", [(8, ["0", "1"]), (7, ["0"])])
def test_max_num_batched_tokens_is_inclusive(max_num_batched_tokens, admitted):
    sched, _, model = start([(5, 1, 2, 0, 1.0), (3, 1, 2, 0, 1.0)], num_blocks=100, block_size=4, num_image_tokens=2,
                            max_num_batched_tokens=max_num_batched_tokens)
    model.step(sched)
    assert [g.request_id for g in model.steps[0].prefilled_groups] == admitted


def test_abort_at_any_step_of_a_tight_run_leaves_the_rest_exact():
    """Abort the guided request at each step of a run that preempts: none of its samples stays queued or running
    (preempted ones included), they are FINISHED, the shared prefix goes with the last guided request, every ref
    count is exact, and the unguided request samples a roomy run's tokens. Aborting everything between
    `schedule()` and the step's `postprocess()` (a failed step; a prefilled prompt not forked yet) empties the
    pool."""
    specs, kw = [(6, 3, 4, 2, 5.0), (5, 2, 6, 6, 1.0)], dict(num_blocks=14, block_size=2, num_image_tokens=4)
    roomy, _, _ = run(specs, num_blocks=1000, block_size=2, num_image_tokens=4)
    seen = set()
    for abort_at in itertools.count():
        sched, bm, model = start(specs, **kw)
        for _ in range(abort_at):
            model.step(sched)
        if "0" not in sched.groups:
            break
        group = sched.groups["0"]
        seen |= {"preempted"} if any(w in group.samples for w in sched.waiting) else set()
        seen |= {"prefix"} if sched.uncond_prefix is not None else set()
        sched.abort("0")
        assert all(s.status is SampleStatus.FINISHED and not s.cond.block_table and s.uncond is None
                   for s in group.samples)
        check_state(sched, bm)
        assert sched.uncond_prefix is None  # no guided request left
        assert finish(sched, model)["1"] == roomy["1"]

        sched, bm, model = start(specs, **kw)
        for _ in range(abort_at):
            model.step(sched)
        sched.schedule()
        seen |= {"prompt"} if any(g.prompt_seq is not None for g in sched.groups.values()) else set()
        for rid in list(sched.groups):
            sched.abort(rid)
        assert bm.num_used_blocks == 0 and sched.uncond_prefix is None and not sched.waiting and not sched.running
    assert seen == {"preempted", "prefix", "prompt"}


def test_a_scheduler_that_lost_a_request_fails_instead_of_spinning():
    """Bookkeeping that holds a request in no queue (a bug) makes `schedule()` raise, not return empty batches to
    an engine that steps while `has_unfinished()`."""
    sched, _ = make_sched(10, 4)
    sched.add(make_group("a", 3, 1, 2, 0, num_image_tokens=2, seed=0))
    sched.waiting.clear()
    with pytest.raises(RuntimeError, match="made no progress"):
        sched.schedule()


# ---------------------------------------------------------------------------------------- the bound, real engine
PROMPTS = ["a", "a cat", "two green squares", "a red cat on a blue table with two green squares"]  # 24/25/31/44 ids


@functools.cache
def tiny(image_size: int):
    """The tiny preset at `image_size` px: (image_size / 16)**2 image tokens. Few image tokens put a sample's
    preemption late in its rows' lives, where resuming it beside the shared prefix does not fit."""
    return build_preset("tiny", image_size=image_size)


def bound(engine: LLMEngine, prompt: str, params: SamplingParams) -> int:
    """`blocks_to_finish_alone` of the request `engine` would make of `prompt`."""
    prompt_ids = engine.bundle.encode_prompts([prompt], params.max_reasoning_tokens)[0]
    group = Group(request_id="x", prompt=prompt, prompt_ids=prompt_ids, params=params, seed=0,
                  num_image_tokens=engine.num_image_tokens)
    return engine.scheduler.blocks_to_finish_alone(group)


def assert_same_rollouts(outputs, reference, atol: float = 1e-4):
    """The same tokens; log-probs up to float rounding (other batch compositions, recomputed KV, sums in another
    order)."""
    for group, ref in zip(outputs, reference, strict=True):
        for s, r in zip(group.samples, ref.samples, strict=True):
            assert s.reasoning_ids == r.reasoning_ids and s.boi_forced == r.boi_forced
            assert torch.equal(s.image_tokens, r.image_tokens)
            for x, y in ((s.text_logprobs, r.text_logprobs), (s.image_logprobs, r.image_logprobs),
                         (s.image_mixed_logprobs, r.image_mixed_logprobs)):
                torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("image_size", [16, 32, 64])
@pytest.mark.parametrize("block_size", [1, 3, 5, 16])
@pytest.mark.parametrize("prompt,reasoning", [(PROMPTS[1], 0), (PROMPTS[3], 5)])
@pytest.mark.parametrize("cfg_weight,n", [(5.0, 1), (5.0, 3), (1.0, 3)])
def test_a_request_alone_peaks_at_exactly_its_bound(monkeypatch, image_size, block_size, prompt, reasoning,
                                                     cfg_weight, n):
    """`blocks_to_finish_alone` is exact. In a pool of that many blocks a request alone (its samples preempting
    one another) finishes with a roomy run's tokens and at some step holds every block; one block fewer is
    refused by `add`, and, admitted regardless, cannot finish: the scheduler fails clearly. Reasoning is
    lock-step (min = max), so the rows reach their longest; 1, 4 or 16 image tokens."""
    bundle = tiny(image_size)
    params = SamplingParams(n=n, max_reasoning_tokens=reasoning, min_reasoning_tokens=reasoning,
                            cfg_weight=cfg_weight, seed=7, decode_images=False)
    roomy = LLMEngine(bundle, EngineConfig(num_kv_blocks=2000, block_size=block_size))
    need = bound(roomy, prompt, params)
    tight = LLMEngine(bundle, EngineConfig(num_kv_blocks=need, block_size=block_size))
    assert_same_rollouts(tight.generate([prompt], params, use_tqdm=False),
                         roomy.generate([prompt], params, use_tqdm=False))
    assert tight.peak_used_blocks == need and tight.block_manager.num_used_blocks == 0
    assert (tight.scheduler.num_preemptions > 0) == (n > 1)  # siblings cannot hold their rows at once
    short = LLMEngine(bundle, EngineConfig(num_kv_blocks=need - 1, block_size=block_size))
    with pytest.raises(ValueError, match=f"can never fit the KV cache: one sample needs up to {need} blocks"):
        short.generate([prompt], params, use_tqdm=False)
    monkeypatch.setattr(Scheduler, "blocks_to_finish_alone", lambda self, group: 0)
    with pytest.raises(RuntimeError, match="KV"):
        short.generate([prompt], params, use_tqdm=False)
    assert not short.has_unfinished() and short.block_manager.num_used_blocks == 0


request_spec = st.tuples(st.sampled_from(PROMPTS), st.integers(1, 4), st.integers(0, 6)).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), st.integers(0, t[2]),
                        st.sampled_from([1.0, 5.0])))


@settings(max_examples=25, deadline=None)
@given(specs=st.lists(request_spec, min_size=2, max_size=4), image_size=st.sampled_from([16, 32]),
       block_size=st.sampled_from([1, 2, 3, 5, 16]), spare=st.integers(0, 1),
       num_scheduler_steps=st.sampled_from([1, 16]), max_num_seqs=st.sampled_from([2, 5, 256]))
def test_mixed_requests_just_above_the_largest_bound_sample_a_roomy_runs_tokens(boi_biased_tiny, specs, image_size,
                                                                                 block_size, spare,
                                                                                 num_scheduler_steps, max_num_seqs):
    """Requests of several prompt and reasoning lengths, guided or not, share a pool of the largest single
    request's bound plus 0 or 1 block: all finish (the scheduler always makes progress), the pool drains, and
    every seeded sample has the tokens of a roomy single-step run: preemption by recompute changes nothing
    sampled. 1 or 4 image tokens: samples are preempted late in their image phase."""
    bundle = boi_biased_tiny(image_size, 5.5)  # reasoning ends after about 3 tokens
    prompts = [p for p, *_ in specs]
    params = [SamplingParams(n=n, max_reasoning_tokens=max_r, min_reasoning_tokens=min_r, cfg_weight=w, seed=i,
                             decode_images=False) for i, (_, n, max_r, min_r, w) in enumerate(specs)]
    roomy = LLMEngine(bundle, EngineConfig(num_kv_blocks=4000, block_size=block_size, num_scheduler_steps=1))
    num_blocks = max(bound(roomy, p, sp) for p, sp in zip(prompts, params)) + spare
    tight = LLMEngine(bundle, EngineConfig(num_kv_blocks=num_blocks, block_size=block_size,
                                           num_scheduler_steps=num_scheduler_steps, max_num_seqs=max_num_seqs))
    assert_same_rollouts(tight.generate(prompts, params, use_tqdm=False),
                         roomy.generate(prompts, params, use_tqdm=False))
    assert tight.block_manager.num_used_blocks == 0 and tight.scheduler.uncond_prefix is None
