"""Engine state: KV rows (`Sequence`), the samples that own them (`Sample`) and requests (`Group`).

A `Group` is one prompt with its `n` samples. Its prompt is prefilled once as `Group.prompt_seq`; the prefill's
last hidden state gives every sample its first token, and the samples then fork the prompt's blocks. A `Sample`
owns one conditional row (`cond`: prompt, reasoning, `<begin_of_image>`, image tokens) and, once it reaches
the image phase, one unconditional CFG row (`uncond`); the two are scheduled, preempted and resumed together.
A request with `cfg_weight == 1` has no unconditional rows: `u + 1 (c - u)` is the conditional logits.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from enum import Enum, auto

from engine.sampling_params import SamplingParams

NO_IMAGE = sys.maxsize  # `Sequence.image_start` of a row that holds text only
_seq_ids = itertools.count()


class SampleStatus(Enum):
    WAITING = auto()  # not prefilled yet (fresh group) or preempted (KV dropped, recomputed on resume)
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    """One row of KV: its tokens, how many of them are in the cache, and the blocks that hold them.

    Tokens before `image_start` are text (embedded with `embed_tokens`), the rest are image codebook ids
    (embedded with the generation embeddings + aligner). The last token is never cached before it is fed.
    """

    token_ids: list[int]
    image_start: int = NO_IMAGE
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True, eq=False)
class Sample:
    """One of a group's samples; `key` seeds its counter-based random numbers."""

    group: Group
    index: int
    key: int
    cond: Sequence
    uncond: Sequence | None = None
    status: SampleStatus = SampleStatus.WAITING
    boi_forced: bool = False
    text_logprobs: list[float] = field(default_factory=list)
    image_logprobs: list[float] = field(default_factory=list)
    image_mixed_logprobs: list[float] = field(default_factory=list)

    @property
    def in_image_phase(self) -> bool:
        return self.cond.image_start != NO_IMAGE

    @property
    def awaits_uncond(self) -> bool:
        """In the image phase of a guided request without its unconditional row (yet to be forked)."""
        return self.uncond is None and self.in_image_phase and self.group.guided

    @property
    def peak_rows(self) -> int:
        """Rows the sample holds in its image phase: the ones `max_num_seqs` is charged for."""
        return 1 + self.group.guided

    @property
    def num_reasoning_tokens(self) -> int:
        """Generated text tokens so far (the `<begin_of_image>` included once sampled)."""
        return min(len(self.cond), self.cond.image_start) - len(self.group.prompt_ids)

    @property
    def num_image_tokens(self) -> int:
        return max(0, len(self.cond) - self.cond.image_start)

    @property
    def reasoning_ids(self) -> list[int]:
        return self.cond.token_ids[len(self.group.prompt_ids):min(len(self.cond), self.cond.image_start)]

    @property
    def image_token_ids(self) -> list[int]:
        return self.cond.token_ids[self.cond.image_start:] if self.in_image_phase else []

    def suppress_boi(self, ahead: int = 0) -> bool:
        """`<begin_of_image>` may not be sampled yet (transformers' `min_new_tokens` rule), `ahead` tokens from now
        (step `ahead` of a multi-step batch, whose tokens the host appends at its end)."""
        return self.num_reasoning_tokens + ahead < self.group.params.min_reasoning_tokens

    def force_boi(self, ahead: int = 0) -> bool:
        """The reasoning budget is spent: the next text token is `<begin_of_image>`, whatever the logits say."""
        return self.num_reasoning_tokens + ahead >= self.group.params.max_reasoning_tokens


@dataclass(eq=False)
class Group:
    """A request: one prompt, its sampling settings and its `n` samples."""

    request_id: str
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    num_image_tokens: int
    prompt_seq: Sequence | None = None
    samples: list[Sample] = field(default_factory=list)
    num_finished: int = 0

    @property
    def max_len(self) -> int:
        """Longest conditional row: prompt + reasoning + forced `<begin_of_image>` + image tokens."""
        return len(self.prompt_ids) + self.params.max_reasoning_tokens + 1 + self.num_image_tokens

    @property
    def guided(self) -> bool:
        """Whether its image tokens need unconditional CFG rows; weight 1 mixes to the conditional logits."""
        return self.params.cfg_weight != 1

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.samples)


def sample_key(seed: int, index: int) -> int:
    """A 63-bit key for sample `index` of a request seeded `seed` (splitmix64 of the pair: keys never collide
    for nearby seeds/indices the way `seed + index` would)."""
    mask = (1 << 64) - 1
    z = ((seed & mask) * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)
