"""What `LLMEngine.generate` returns: one `GroupOutput` per prompt, one `SampleOutput` per sample."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from gotr1.chain import ParsedChain


@dataclass(slots=True)
class SampleOutput:
    """One GoT sample with the log-probs GRPO needs.

    `text_logprobs[t]` is `log_softmax(lm_head(h_t) / T_text)[reasoning_ids[t]]` under the policy, before any
    top-k/top-p filtering and before the `min_reasoning_tokens` ban on BOI (T = 1 when greedy), a forced BOI
    included; `image_logprobs` is the same on the conditional branch's generation head, and
    `image_mixed_logprobs` on the CFG-mixed logits `u + w (c - u)` the tokens were sampled from (equal to
    `image_logprobs` when `cfg_weight` is 1: no unconditional row is run then).
    """

    prompt_ids: list[int]
    reasoning_ids: list[int]  # generated text tokens, always ending with <begin_of_image>
    boi_forced: bool  # True when max_reasoning_tokens forced the <begin_of_image>
    reasoning_text: str
    chain: ParsedChain
    image_tokens: torch.Tensor  # LongTensor [num_image_tokens]
    image: Image.Image | None
    text_logprobs: torch.Tensor  # FloatTensor [len(reasoning_ids)]
    image_logprobs: torch.Tensor  # FloatTensor [num_image_tokens]
    image_mixed_logprobs: torch.Tensor  # FloatTensor [num_image_tokens]


@dataclass(slots=True)
class GroupOutput:
    request_id: str
    prompt: str
    samples: list[SampleOutput]
