"""Prompt files and a seeded, resumable, shardable prompt stream."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (text) or one JSON object with a "prompt" key per line (JSONL); blanks skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} {'is not a file' if path.exists() else 'does not exist'}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e}") from e
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"{path}:{n}: a JSONL line needs a non-empty \"prompt\" string")
            line = record["prompt"].strip()
        prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of `count` items in `epoch`: a shuffle seeded with `seed + epoch`, so a resumed run
    needs only `(epoch, position)` (GRPO prompts and SFT examples alike)."""
    order = list(range(count))
    random.Random(seed + epoch).shuffle(order)
    return order


@dataclass
class PromptStream:
    """Endless prompts, reshuffled each epoch with `seed + epoch`; `(epoch, position)` is all its state."""

    prompts: list[str]
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("the prompt list is empty")
        self._shuffle()

    def _shuffle(self) -> None:
        self._order = epoch_order(len(self.prompts), self.seed, self.epoch)

    def take(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        """Restore `state()`; a position past this prompt list (a shorter file on resume) is an error, not a skip."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.prompts):
            raise ValueError(f"data state epoch {epoch}, position {position} does not fit {len(self.prompts)} "
                             "prompts (resumed with another prompt file?)")
        self.epoch, self.position = epoch, position
        self._shuffle()
