"""Per-request generation settings (vLLM's `SamplingParams`, extended with the GoT image phase)."""
from __future__ import annotations

from dataclasses import dataclass

# Settings reach the sampling kernels as float32 and int64. Beyond these bounds a temperature or guidance weight
# turns logits into inf or NaN (garbage tokens, not an error); a positive temperature under MIN_TEMPERATURE is
# greedy in all but name (0 asks for greedy). Within them |logits| * (1 + w) / T stays far below float32's max.
MIN_TEMPERATURE, MAX_TEMPERATURE, MAX_CFG_WEIGHT, MAX_TOP_K = 1e-3, 1e3, 1e3, 2**63 - 1


@dataclass(slots=True)
class SamplingParams:
    """How one request (a prompt and its group of `n` samples) is generated.

    A temperature of 0 is greedy decoding (log-probs are then reported at temperature 1). `top_k` (0 = off) and
    `top_p` (1 = off) filter both the text and the image distributions, as transformers' `generate` does.
    `min_reasoning_tokens` keeps `<begin_of_image>` from being sampled until that many reasoning tokens exist
    (transformers' `min_new_tokens`); after `max_reasoning_tokens` reasoning tokens `<begin_of_image>` is forced.
    `cfg_weight=1` samples images from the conditional logits (on-policy) and runs no unconditional CFG rows.
    Sample `i` of a request draws its random numbers from the key `(seed, i)` and the token position only, so
    its tokens do not depend on what else shares the batch; `seed=None` draws a seed from torch's generator.
    """

    n: int = 16
    text_temperature: float = 1.0
    image_temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_weight: float = 5.0
    max_reasoning_tokens: int = 600
    min_reasoning_tokens: int = 0
    seed: int | None = None
    decode_images: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        for name in ("text_temperature", "image_temperature"):
            t = getattr(self, name)
            if not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
                raise ValueError(f"{name} must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an int in [0, 2**63) (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.cfg_weight <= MAX_CFG_WEIGHT:
            raise ValueError(f"cfg_weight must be in [0, {MAX_CFG_WEIGHT}], got {self.cfg_weight!r}")
        if not isinstance(self.max_reasoning_tokens, int) or self.max_reasoning_tokens < 0:
            raise ValueError(f"max_reasoning_tokens must be an int >= 0, got {self.max_reasoning_tokens!r}")
        if not isinstance(self.min_reasoning_tokens, int) or not 0 <= self.min_reasoning_tokens \
                <= self.max_reasoning_tokens:
            raise ValueError(f"min_reasoning_tokens must be an int in [0, max_reasoning_tokens="
                             f"{self.max_reasoning_tokens}], got {self.min_reasoning_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
