"""What a judge consumes and produces: `RewardSample` in, `RewardBreakdown` out, behind a one-method `Judge`.

The protocol is deliberately one method over a whole batch, so that a model judge can batch everything a GRPO step
needs and an exact programmatic judge (the synthetic shapes world) can implement it in a few lines.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from gotr1.chain import GOT_TAGS, ParsedChain, format_object, parse_chain
from kernels.advantages import REWARD_COLUMNS

# Column order of `RewardBreakdown.as_matrix()`: the advantage kernel's `[G*N, 4]` input, defined there.
COMPONENTS = REWARD_COLUMNS


@dataclass(frozen=True)
class RewardSample:
    """One rollout to score: the user prompt, its parsed chain, the generated image (any size, any mode).

    `reasoning` is the chain as the policy wrote it (prose and tags); R_sem judges that text. When absent, the
    parsed objects stand in for it. `image_tokens` are the image's VQ codes when the policy generated it (the GRPO
    driver passes them): a judge that works on codes can skip the pixels; `QwenVLJudge` ignores them. `image` is
    None where nobody VQ-decoded the codes (GRPO with a judge that declares `needs_images = False`).
    """

    prompt: str
    chain: ParsedChain
    image: Image.Image | None = None
    reasoning: str | None = None
    image_tokens: torch.Tensor | None = None

    @classmethod
    def from_text(cls, prompt: str, reasoning: str, image: Image.Image) -> RewardSample:
        return cls(prompt=prompt, chain=parse_chain(reasoning), image=image, reasoning=reasoning)

    def pixels(self) -> Image.Image:
        """`image` for a judge that reads pixels: a clear error, not an AttributeError deep in it, when absent."""
        if self.image is None:
            raise ValueError("this sample has no image (RewardSample.image is None: its image tokens were not "
                             "VQ-decoded); a judge that reads pixels must not set needs_images = False")
        return self.image

    def reasoning_text(self) -> str:
        """The chain as the judge reads it: GoT tags removed, so `<|obj_start|>cat<|obj_end|> <|box_start|>(1,2),
        (3,4)<|box_end|>` reads `cat (1,2),(3,4)` (how the paper's figures show chains)."""
        text = self.reasoning if self.reasoning is not None else " ".join(map(format_object, self.chain.objects))
        for tag in GOT_TAGS:
            text = text.replace(tag, "")
        return " ".join(text.split())


def reward_samples(groups) -> list[RewardSample]:
    """Every sample of the engine's `GroupOutput`s, in order, as the judge sees it (GRPO and evaluation alike)."""
    return [RewardSample(prompt=g.prompt, chain=s.chain, image=s.image, reasoning=s.reasoning_text,
                         image_tokens=s.image_tokens) for g in groups for s in g.samples]


@dataclass
class RewardBreakdown:
    """Per-sample components, each a float32 tensor `[B]` in [0, 1], and per-component counts of judge answers
    that could not be parsed (they scored 0). For R_RI the count is over grounding answers, one per object."""

    R_PI: torch.Tensor
    R_sem: torch.Tensor
    R_spa: torch.Tensor
    R_RI: torch.Tensor
    unparsable: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = set()
        for name in COMPONENTS:
            value = torch.as_tensor(getattr(self, name), dtype=torch.float32)
            if value.ndim != 1:
                raise ValueError(f"{name} must be a 1-D tensor [B], got shape {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()) or bool(((value < 0) | (value > 1)).any()):
                raise ValueError(f"{name} must be finite and in [0, 1], got {value.tolist()}")
            sizes.add(value.numel())
            setattr(self, name, value)
        if len(sizes) != 1:
            raise ValueError(f"components disagree on the batch size: {sorted(sizes)}")
        unknown = set(self.unparsable) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unparsable counts for unknown components {sorted(unknown)}; known: {COMPONENTS}")
        self.unparsable = {name: int(self.unparsable.get(name, 0)) for name in COMPONENTS}

    def __len__(self) -> int:
        return self.R_PI.numel()

    def as_matrix(self) -> torch.Tensor:
        """`[B, 4]` in `COMPONENTS` order."""
        return torch.stack([getattr(self, name) for name in COMPONENTS], dim=1)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means of every component and the unparsable counts, for the training log."""
        out = {f"{prefix}{name}": float(getattr(self, name).mean()) if len(self) else 0.0 for name in COMPONENTS}
        out.update({f"{prefix}unparsable/{name}": float(n) for name, n in self.unparsable.items()})
        return out


@runtime_checkable
class Judge(Protocol):
    """Scores a batch; must return one value per sample and component, in [0, 1], and never raise on bad
    model output (unparsable answers score 0 and are counted).

    A judge that reads only `image_tokens` and text says so with a class attribute `needs_images = False`: GRPO
    then skips VQ-decoding every rollout (seconds a step). The attribute is optional (see `needs_images`) and so
    not a member of the protocol, whose runtime `isinstance` check would then refuse every judge without it.
    """

    def score(self, samples: Sequence[RewardSample]) -> RewardBreakdown: ...


def needs_images(judge: Judge) -> bool:
    """Whether `judge` reads `RewardSample.image`: its `needs_images` attribute, True when it has none (pixels are
    the safe default: a judge that cannot say otherwise gets them)."""
    value = getattr(judge, "needs_images", True)
    if not isinstance(value, bool):
        raise TypeError(f"{type(judge).__name__}.needs_images must be a bool, got {value!r}")
    return value
