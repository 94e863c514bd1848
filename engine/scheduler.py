"""Continuous batching over groups, samples and CFG pairs (nano-vllm's scheduler, prefill-first, with
recompute preemption), plus the one unconditional prefix every CFG row shares.

The unconditional CFG row of a conditional row `[BOS, prompt..., reasoning..., BOI]` of length L is
`[BOS, PAD x (L-2), BOI]` (GoT-R1's `infer.py`; DeepSeek's `tokens[1:-1] = pad`). transformers' Janus
`generate(generation_mode="image")` blanks every token that is neither BOS nor BOI instead, which is the same
sequence unless the reasoning itself contains a BOS token. The KV of `[BOS, PAD, ...]` at any position is the
same for every row of every request, so it is computed once (`uncond_prefix`, grown on demand) and forked:
each unconditional row shares the prefix's blocks up to position L-2 and copies only the partial block its
BOI is written into. Requests with `cfg_weight == 1` (unguided) get no unconditional row: their image tokens are
sampled from the conditional row alone, and the prefix exists only while some request is guided.
"""
from __future__ import annotations

import functools
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sequence import Group, Sample, SampleStatus, Sequence


@dataclass(slots=True)
class ScheduledBatch:
    """One forward (or `num_steps` decode forwards of the same rows): the rows with their new tokens, the block
    copies to apply first, and what each row's last hidden state is for: a text token of `text_samples[i]`, or
    the image token of `image_samples[i]` (its conditional row `cond_rows[i]`; `uncond_rows` holds the
    unconditional rows of the guided ones, in order)."""

    is_prefill: bool
    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # position of each row's first new token
    query_lens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    text_rows: list[int] = field(default_factory=list)
    text_samples: list[Sample] = field(default_factory=list)
    cond_rows: list[int] = field(default_factory=list)
    uncond_rows: list[int] = field(default_factory=list)
    image_samples: list[Sample] = field(default_factory=list)
    prefilled_groups: list[Group] = field(default_factory=list)
    num_steps: int = 1  # decode steps run back to back (row r feeds position `starts[r] + j` in step j)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def add_row(self, seq: Sequence, copies: list[tuple[int, int]]) -> int:
        """Schedule all of `seq`'s uncached tokens (their slots are already allocated); returns the row index."""
        self.seqs.append(seq)
        self.starts.append(seq.num_cached_tokens)
        self.query_lens.append(len(seq) - seq.num_cached_tokens)
        self.copies.extend(copies)
        seq.num_cached_tokens = len(seq)  # the forward that follows computes them
        return len(self.seqs) - 1


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, *, bos_id: int, pad_id: int,
                 boi_id: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.num_scheduler_steps = config.num_scheduler_steps
        self.num_image_scheduler_steps = config.num_image_scheduler_steps
        self.block_manager = block_manager
        self.bos_id, self.pad_id, self.boi_id = bos_id, pad_id, boi_id
        self.waiting: deque[Group | Sample] = deque()
        self.running: list[Sample] = []
        self.groups: dict[str, Group] = {}
        self.uncond_prefix: Sequence | None = None
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------------------------ requests
    def blocks_to_finish_alone(self, group: Group) -> int:
        """The least KV pool in which one sample of `group` finishes with nothing else in it (`add` refuses a
        request that needs more). A row's KV holds at most `max_len - 1` positions (the last image token is
        sampled, never fed); at its last image step a guided sample holds two such rows, which share no block.
        Nothing earlier needs more: the prompt and the text phase fit in one row's blocks, the shared prefix
        (prompt + reasoning positions at most) fits beside the conditional row, and a guided sample that does not
        fit beside the prefix takes the prefix's blocks over (`_admit`) or drops the prefix (`_schedule_decode`),
        so neither the fork's copy-on-write block nor the prefix's unshared tail is ever paid on top."""
        return self.block_manager.blocks_for(group.max_len - 1) * (1 + group.guided)

    def add(self, group: Group) -> None:
        if group.request_id in self.groups:
            raise ValueError(f"request id {group.request_id!r} is already in use")
        need = self.blocks_to_finish_alone(group)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"request {group.request_id!r} can never fit the KV cache: one sample needs up to {need} blocks "
                f"of {self.block_manager.block_size} tokens (prompt {len(group.prompt_ids)} + reasoning "
                f"{group.params.max_reasoning_tokens} + 1 + {group.num_image_tokens} image tokens"
                f"{', conditional and unconditional rows' if group.guided else ''}), the pool has "
                f"{self.block_manager.num_blocks}; raise num_kv_blocks / "
                f"kv_cache_memory_bytes or lower max_reasoning_tokens")
        self.groups[group.request_id] = group
        self.waiting.append(group)

    def abort(self, request_id: str) -> Group:
        """Forget a request, whatever state it is in, and free its blocks."""
        group = self.groups.pop(request_id, None)
        if group is None:
            raise KeyError(f"no unfinished request {request_id!r}")
        self.waiting = deque(w for w in self.waiting if w is not group and getattr(w, "group", None) is not group)
        self.running = [s for s in self.running if s.group is not group]
        for s in group.samples:
            self._free_rows(s)
            s.status = SampleStatus.FINISHED
        if group.prompt_seq is not None:
            self.block_manager.free(group.prompt_seq)
            group.prompt_seq = None
        self._drop_prefix_if_unneeded()
        return group

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # ------------------------------------------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch:
        """Prefill work first (prefix growth, preempted samples, new groups), else one decode step."""
        self._attach_uncond_rows()
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        batch = self._schedule_decode()
        if not batch.seqs and self.groups:
            raise RuntimeError("scheduler made no progress with unfinished requests (a bug: please report)")
        return batch

    def _attach_uncond_rows(self) -> None:
        """Give each sample that just sampled BOI its unconditional row, forked from the shared prefix."""
        ready = self.uncond_prefix.num_cached_tokens if self.uncond_prefix is not None else 0
        for s in self.running:
            if s.awaits_uncond and s.cond.image_start - 1 <= ready:
                s.uncond = self._fork_uncond(s)

    def _fork_uncond(self, s: Sample) -> Sequence:
        length = s.cond.image_start  # the conditional row's text part, BOI included
        uncond = Sequence([self.bos_id] + [self.pad_id] * (length - 2) + s.cond.token_ids[length - 1:],
                          image_start=length)
        uncond.block_table = self.block_manager.fork(self.uncond_prefix.block_table, length - 1)
        uncond.num_cached_tokens = length - 1
        return uncond

    def _prefix_target(self) -> tuple[int, bool]:
        """How long the shared prefix must grow, and whether a running sample waits for it. Each sample that
        waits asks for its request's longest possible need, so a group's samples reaching BOI at different
        lengths extend it once, not n times."""
        have = self.uncond_prefix.num_cached_tokens if self.uncond_prefix is not None else 0
        head = self.waiting[0] if self.waiting and isinstance(self.waiting[0], Sample) else None
        target, running_waits = 0, False
        for s in [s for s in self.running if s.awaits_uncond] + ([head] if head and head.awaits_uncond else []):
            if s.cond.image_start - 1 > have:
                target = max(target, len(s.group.prompt_ids) + s.group.params.max_reasoning_tokens)
                running_waits |= s is not head
        return target, running_waits

    def _schedule_prefill(self) -> ScheduledBatch:
        bm = self.block_manager
        batch = ScheduledBatch(is_prefill=True)
        # The prefix's KV this step's admissions may fork: what it held before the step, while it is still the
        # scheduler's prefix (growth in this step is computed by its forward, too late; a dropped one is gone).
        computed = self.uncond_prefix
        ready = computed.num_cached_tokens if computed is not None else 0
        target = self._prefix_target()[0]
        prefix = computed if computed is not None else Sequence([self.bos_id])

        def need() -> int:
            return bm.blocks_needed(prefix.block_table, prefix.num_cached_tokens, target - prefix.num_cached_tokens)

        if target and self._room_for_prefix(need):
            self.uncond_prefix = prefix
            prefix.token_ids.extend([self.pad_id] * (target - len(prefix)))
            batch.add_row(prefix, bm.append(prefix, target - prefix.num_cached_tokens))
        rows = sum(s.peak_rows for s in self.running) if self.waiting else 0
        while self.waiting:
            item = self.waiting[0]
            plan = self._admission(item, ready if self.uncond_prefix is computed else 0)
            if plan is None:
                break
            peak_rows, tokens, blocks = plan
            alone = not self.running and not batch.seqs
            if not alone and (batch.num_tokens + tokens > self.max_num_batched_tokens
                              or rows + peak_rows > self.max_num_seqs
                              or blocks + rows + peak_rows > bm.num_free_blocks):
                break
            take_prefix = False
            if alone and blocks > bm.num_free_blocks:  # the prefix is the only other holder of blocks
                if self.uncond_prefix is None:
                    raise RuntimeError("a request that fits an empty KV cache could not be admitted (a bug)")
                if not (isinstance(item, Sample) and item.awaits_uncond):
                    self._drop_prefix()  # recomputed when needed
                    continue
                take_prefix = True  # dropping it would leave nothing to fork: inherit its blocks instead
            self.waiting.popleft()
            self._admit(item, batch, take_prefix)
            rows += peak_rows
        return batch

    def _admission(self, item: Group | Sample, prefix_ready: int) -> tuple[int, int, int] | None:
        """(peak rows, prefill tokens, free blocks) that admitting `item` takes; None while it needs a prefix
        that is not computed yet."""
        bm = self.block_manager
        if isinstance(item, Group):
            return sum(s.peak_rows for s in item.samples), len(item.prompt_ids), bm.blocks_for(len(item.prompt_ids))
        cond = item.cond
        if not item.awaits_uncond:  # text phase, or an unguided image phase: the conditional row alone
            return item.peak_rows, len(cond), bm.blocks_for(len(cond))
        shared = cond.image_start - 1
        if shared > prefix_ready:
            return None
        uncond_blocks = bm.blocks_for(len(cond)) - shared // bm.block_size  # the partial shared block is copied
        return 2, 2 * len(cond) - shared, bm.blocks_for(len(cond)) + uncond_blocks

    def _admit(self, item: Group | Sample, batch: ScheduledBatch, take_prefix: bool = False) -> None:
        """Prefill `item`. `take_prefix`: a guided image-phase sample alone in a pool too small for it beside the
        prefix forks the prefix and then drops it, so that its unconditional row is the shared blocks' only holder
        and writes its BOI block in place: its two rows then take no more blocks than they hold at their end."""
        bm = self.block_manager
        if isinstance(item, Group):
            seq = item.prompt_seq = Sequence(list(item.prompt_ids))
            row = batch.add_row(seq, bm.append(seq, len(seq)))
            batch.prefilled_groups.append(item)
            for s in item.samples:
                s.status = SampleStatus.RUNNING
                batch.text_rows.append(row)
                batch.text_samples.append(s)
            self.running.extend(item.samples)
            return
        if item.awaits_uncond:
            item.uncond = self._fork_uncond(item)
            if take_prefix:
                self._drop_prefix()
        item.status = SampleStatus.RUNNING
        self.running.append(item)
        row = batch.add_row(item.cond, bm.append(item.cond, len(item.cond)))
        if not item.in_image_phase:
            batch.text_rows.append(row)
            batch.text_samples.append(item)
            return
        batch.cond_rows.append(row)
        batch.image_samples.append(item)
        if item.uncond is not None:
            copies = bm.append(item.uncond, len(item.uncond) - item.uncond.num_cached_tokens)
            batch.uncond_rows.append(batch.add_row(item.uncond, copies))

    def _schedule_decode(self) -> ScheduledBatch:
        """One token per running sample, as many as fit. No running sample awaits its unconditional row here:
        the prefill step grows the prefix for such samples or preempts them. Unconditional rows go after all the
        others (their blocks are made writable in the loop, the rows added at the end), so that an image step's
        conditional and unconditional rows are two consecutive runs and its heads read one slice of the hidden
        states."""
        bm = self.block_manager
        batch = ScheduledBatch(is_prefill=False)
        scheduled: set[int] = set()  # ids of samples in this step: never preempted by a later one
        uncond: list[tuple[Sequence, list[tuple[int, int]]]] = []
        rows = i = 0
        while i < len(self.running):
            s = self.running[i]
            pair = s.uncond is not None
            if rows + 1 + pair > self.max_num_seqs:
                break
            scheduled.add(id(s))
            if self._decode_need(s) > bm.num_free_blocks \
                    and not self._make_room(functools.partial(self._decode_need, s), scheduled):
                scheduled.discard(id(s))
                if batch.seqs:  # only scheduled samples are left: they hold the blocks, it resumes later
                    self._preempt(s)
                    break
                if self.uncond_prefix is None:
                    raise RuntimeError("a sample alone in the KV cache ran out of blocks (a bug: requests are "
                                       "checked to fit when added)")
                self._drop_prefix()
                continue
            i += 1  # preemptions took only samples after it: those before it are scheduled
            row = batch.add_row(s.cond, bm.append(s.cond, 1))
            if s.in_image_phase:
                batch.cond_rows.append(row)
                batch.image_samples.append(s)
                if pair:
                    uncond.append((s.uncond, bm.append(s.uncond, 1)))
            else:
                batch.text_rows.append(row)
                batch.text_samples.append(s)
            rows += 1 + pair
        for seq, copies in uncond:
            batch.uncond_rows.append(batch.add_row(seq, copies))
        self._multi_step(batch)
        return batch

    def _multi_step(self, batch: ScheduledBatch) -> None:
        """Let a decode step run as `num_steps` steps in one go (vLLM's multi-step scheduling), their slots
        allocated now (a row holds at most ceil((k - 1) / block_size) blocks ahead of need; with blocks short for
        an image-only window it is tried at `num_scheduler_steps`, then stays one step, never a preemption for a
        longer window). An image row takes one token per step whatever it samples, so the window ends no later
        than the first image is complete; an image-only window with nothing waiting is bounded by
        `num_image_scheduler_steps` alone (None: that completion). A text row may sample `<begin_of_image>`
        inside the window: its later steps are wasted (their tokens are dropped, their KV lies past the row's
        tokens and is overwritten before anything reads it); the window ends no later than the step that forces
        it."""
        if self.num_scheduler_steps == 1 or not batch.seqs:
            return
        k = self.num_scheduler_steps
        if not batch.text_samples and not self.waiting:
            k = self.num_image_scheduler_steps or sys.maxsize
        for s in batch.image_samples:
            k = min(k, s.group.num_image_tokens - s.num_image_tokens)
        for s in batch.text_samples:
            k = min(k, s.group.params.max_reasoning_tokens - s.num_reasoning_tokens + 1)
        bm = self.block_manager
        for steps in (k, min(k, self.num_scheduler_steps)):  # the longer window first
            if steps >= 2 and sum(bm.blocks_needed(seq.block_table, seq.num_cached_tokens, steps - 1)
                                  for seq in batch.seqs) <= bm.num_free_blocks:
                for seq in batch.seqs:
                    batch.copies.extend(bm.append(seq, steps - 1))
                    seq.num_cached_tokens += steps - 1
                batch.num_steps = steps
                return

    def cut_window(self, batch: ScheduledBatch) -> None:
        """After a window that ran fewer than its `num_steps` steps (the engine was interrupted): each row's
        unrun steps are uncached again (their KV was never written), so the next step feeds the row's last token,
        and the blocks allocated for them return to the pool (an image-only window allocates up to an image's
        worth: the request whose arrival cut the window may need them)."""
        for seq in batch.seqs:
            seq.num_cached_tokens = min(seq.num_cached_tokens, len(seq) - 1)
            self.block_manager.trim(seq)

    def _decode_need(self, s: Sample) -> int:
        """Free blocks the next decode step of `s` takes (both rows of a pair)."""
        bm = self.block_manager
        need = bm.blocks_needed(s.cond.block_table, s.cond.num_cached_tokens, 1)
        if s.uncond is not None:
            need += bm.blocks_needed(s.uncond.block_table, s.uncond.num_cached_tokens, 1)
        return need

    def _make_room(self, need: Callable[[], int], protected: set[int] = frozenset()) -> bool:
        """Preempt the most recently admitted samples outside `protected` (ids) until `need()` blocks are free;
        asked again after each preemption, which can unshare a block the requester was to copy."""
        bm = self.block_manager
        while need() > bm.num_free_blocks:
            victim = next((s for s in reversed(self.running) if id(s) not in protected), None)
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _room_for_prefix(self, need: Callable[[], int]) -> bool:
        """Free `need()` blocks for the prefix's growth. Growth for running samples preempts running samples
        (most recently admitted first, a waiting one included), but only while a running sample still waits for
        it: once the preemptions have sent every such sample back to the queue, the growth is for the queue alone,
        which takes free blocks only (preempting running samples for it would let them and it take turns
        preempting each other in a tight pool; it waits until running samples finish and free blocks). False: no
        growth this step."""
        while need() > self.block_manager.num_free_blocks:
            if not self._prefix_target()[1]:
                return False
            self._preempt(self.running[-1])
        return True

    def _preempt(self, s: Sample) -> None:
        """Recompute preemption: drop the sample's KV (both rows); it keeps its tokens and resumes first."""
        self.running.remove(s)
        self._free_rows(s)
        s.status = SampleStatus.WAITING
        self.waiting.appendleft(s)
        self.num_preemptions += 1

    def _free_rows(self, s: Sample) -> None:
        if s.cond.block_table:
            self.block_manager.free(s.cond)
        if s.uncond is not None:
            self.block_manager.free(s.uncond)
            s.uncond = None

    def _drop_prefix(self) -> None:
        if self.uncond_prefix is not None:
            self.block_manager.free(self.uncond_prefix)
            self.uncond_prefix = None

    def _drop_prefix_if_unneeded(self) -> None:
        """With no guided request left, the prefix goes too: its blocks return to the pool (which drains to zero
        when idle), and the next guided request recomputes it with whatever weights the model has by then."""
        if self.uncond_prefix is not None and not any(g.guided for g in self.groups.values()):
            self._drop_prefix()

    # ------------------------------------------------------------------------------------------------ results
    def postprocess(self, batch: ScheduledBatch, text_tokens: list[list[int]], text_logprobs: list[list[float]],
                    image_tokens: list[list[int]], image_logprobs: list[list[float]],
                    image_mixed_logprobs: list[list[float]]) -> list[Group]:
        """Append what the batch's steps sampled (once, after its last step), per sample: one list over the steps
        for each of its text rows (token, log-prob) and image samples (token, conditional and mixed log-probs);
        returns the groups that finished with it. A text row that sampled `<begin_of_image>` keeps nothing after it
        (the window's later steps were waste for it); an image sample's window ends no later than its image
        (`_multi_step`), so it finishes at the last step or not."""
        bm = self.block_manager
        for group in batch.prefilled_groups:  # the samples fork the prompt's KV, computed once
            prompt = group.prompt_seq
            for s in group.samples:
                s.cond.block_table = bm.fork(prompt.block_table, len(prompt))
                s.cond.num_cached_tokens = len(prompt)
            bm.free(prompt)
            group.prompt_seq = None
        for s, toks, lps in zip(batch.text_samples, text_tokens, text_logprobs, strict=True):
            kept = toks.index(self.boi_id) + 1 if self.boi_id in toks else len(toks)
            forced = s.force_boi(kept - 1)
            s.cond.token_ids += toks[:kept]
            s.text_logprobs += lps[:kept]
            if toks[kept - 1] == self.boi_id:
                s.cond.image_start = len(s.cond)
                s.cond.num_cached_tokens = len(s.cond) - 1  # a multi-step batch ran past it
                s.boi_forced = forced
        finished: list[Group] = []
        done = False
        for s, toks, lps, mlps in zip(batch.image_samples, image_tokens, image_logprobs, image_mixed_logprobs,
                                      strict=True):
            s.cond.token_ids += toks
            if s.uncond is not None:
                s.uncond.token_ids += toks
            s.image_logprobs += lps
            s.image_mixed_logprobs += mlps
            if s.num_image_tokens == s.group.num_image_tokens:
                self._free_rows(s)
                s.status = SampleStatus.FINISHED
                done = True
                s.group.num_finished += 1
                if s.group.finished:
                    del self.groups[s.group.request_id]
                    finished.append(s.group)
        if done:
            self.running = [s for s in self.running if s.status is SampleStatus.RUNNING]
            self._drop_prefix_if_unneeded()
        return finished
