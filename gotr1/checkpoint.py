"""Atomic training checkpoints that resume exactly.

A checkpoint is a directory `checkpoint-{step}` holding the LoRA adapter in peft's own format (loadable by
peft alone; full weights when LoRA is off), the optimizer, scheduler, fp16 loss scaler and every RNG state, the
step and the data position. It is written under a temporary name and renamed into place, and `latest` (a one-line
file) is replaced atomically after it, so a crash at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LATEST = "latest"
STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk: a rename is only as durable as what it publishes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save_checkpoint(output_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, extra: dict[str, Any], scaler: Any = None) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically and point `latest` at it. `scaler`: anything with a
    `state_dict()` (a `LossScaler`, a `GradScaler`), stored as "scaler" ({} when disabled)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **({} if scaler is None else {"scaler": scaler.state_dict()}), **extra},
               tmp / STATE)
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(tmp)
    # A checkpoint of this step exists when a run resumed from an earlier one: it is renamed aside, never deleted
    # in place, so `latest` (which may name it) is left without a complete checkpoint only between two renames.
    aside = output_dir / f".checkpoint-{step}.old"
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _write_text_atomic(output_dir / LATEST, final.name + "\n")
    if aside.exists():
        shutil.rmtree(aside)
    return final


def resolve_checkpoint(resume: str | Path) -> Path:
    """A checkpoint directory from a path to one, or from a run directory (its `latest`)."""
    path = Path(resume)
    if (path / STATE).is_file():
        return path
    if (path / LATEST).is_file():
        target = path / (path / LATEST).read_text().strip()
        if (target / STATE).is_file():
            return target
        raise FileNotFoundError(f"{path / LATEST} points to {target}, which holds no {STATE}")
    raise FileNotFoundError(f"no checkpoint at {path}: expected a checkpoint-N directory or a run directory "
                            f"with a '{LATEST}' file")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (and a torn last line): a resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    _write_text_atomic(path, "".join(kept))


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE, map_location="cpu", weights_only=False)


def load_adapter_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load the saved trainable weights (peft adapter or full model) into `model` in place."""
    from safetensors.torch import load_file

    if (checkpoint / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        if result.unexpected_keys:  # peft ignores them: an adapter of other target modules would load nothing
            raise ValueError(f"{checkpoint}: adapter weights this model has no place for (other LoRA target "
                             f"modules?): {result.unexpected_keys[:5]}")
    else:
        files = sorted(checkpoint.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{checkpoint} holds no weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{checkpoint}: unexpected weights {unexpected[:5]}")


class Checkpointed:
    """Save/resume for a trainer holding `bundle`, `optimizer`, `scheduler`, `loss_scaler` (`LossScaler`),
    `config`, `step`, `history` and `output_dir`; the trainer says how its data position is stored (`data_state` /
    `load_data_state`)."""

    def data_state(self) -> dict[str, int]:
        raise NotImplementedError

    def load_data_state(self, state: dict[str, int]) -> None:
        raise NotImplementedError

    def save(self) -> Path:
        return save_checkpoint(self.output_dir, self.step, self.bundle.model, self.optimizer, self.scheduler,
                               {"data": self.data_state(), "history": self.history,
                                "config": dataclasses.asdict(self.config), "trainer": type(self).__name__},
                               scaler=self.loss_scaler)

    def resume(self, path: str | Path) -> Path:
        checkpoint = resolve_checkpoint(path)
        state = load_state(checkpoint)
        if state.get("trainer", type(self).__name__) != type(self).__name__:  # an SFT run's optimizer and step
            raise ValueError(f"{checkpoint} was written by {state['trainer']}, not {type(self).__name__}: start "
                             f"from its exported model instead of resuming it")
        load_adapter_weights(self.bundle.model, checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_scaler.load_state_dict(state.get("scaler"))  # absent from checkpoints before fp16 loss scaling
        set_rng_state(state["rng"])
        self.load_data_state(state["data"])
        self.step, self.history = state["step"], state.get("history", [])
        if getattr(self, "rank", 0) == 0:
            truncate_metrics(Path(self.output_dir) / METRICS, self.step)
        return checkpoint
