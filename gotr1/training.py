"""What SFT and GRPO share: which parameters train (LoRA on the language model, or full), the LR schedule and the
optimizer step with its fp16 loss scaling."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gotr1.model import JanusBundle

FROZEN_PREFIXES = ("model.vqmodel.", "model.vision_model.", "model.aligner.")


def add_lora(bundle: JanusBundle, config) -> None:
    """Wrap the language model's attention and MLP projections (never the vision tower) with LoRA, in place."""
    from peft import LoraConfig, get_peft_model

    if not config.use_lora:  # full fine-tuning of everything that generates; the encoders stay frozen
        for name, p in bundle.model.named_parameters():
            p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
        return
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    bundle.model = get_peft_model(bundle.model, LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules))


def lr_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total_steps)


class LossScaler:
    """Dynamic loss scaling for `dtype="float16"`, as transformers' Trainer does with `fp16=True` (torch's
    `GradScaler`): the loss is multiplied by a scale (2^16 at first) so that small gradients survive fp16; gradients
    are unscaled before clipping; a step whose gradients hold inf/NaN is skipped and the scale halved (doubled after
    2000 clean steps). bfloat16 and float32 have fp32's exponent range and need none: there the scaler is disabled,
    `scale` is 1 and `step` is exactly clip, optimizer step, scheduler step, as without it, except that a non-finite
    gradient norm raises instead of poisoning the weights.

    The fused GRPO loss stores its 16-bit gradients in its forward, before any backward scale could reach them: the
    driver passes it `scale` (`grpo_objective(grad_scale=...)`) and backpropagates through `backward`."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], dtype: str):
        enabled = dtype == "float16"
        half = [p for p in params if p.dtype == torch.float16]
        if enabled and half:  # GradScaler.unscale_ refuses them, and an fp16 weight rounds small updates away
            raise ValueError(f"dtype='float16' needs fp32 trainable parameters (peft keeps LoRA adapters in fp32), "
                             f"found {len(half)} fp16 ones: use use_lora=True, or dtype='bfloat16' for full "
                             f"fine-tuning")
        self.optimizer, self.params = optimizer, list(params)
        device = self.params[0].device.type if self.params else "cpu"
        self.scaler = torch.amp.GradScaler(device, enabled=enabled)
        self._stepped = False
        optimizer.register_step_post_hook(lambda *_: setattr(self, "_stepped", True))

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    @property
    def scale(self) -> float:
        """The scale the next backward multiplies the loss by (1.0 when disabled)."""
        return self.scaler.get_scale()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, scheduler: Any, max_grad_norm: float) -> dict[str, float]:
        """Unscale, clip, step the optimizer unless the gradients hold inf/NaN, update the scale, zero the gradients.
        The LR scheduler steps only when the optimizer did, as in transformers' Trainer (`_inner_training_loop`:
        `if not self.accelerator.optimizer_step_was_skipped: self.lr_scheduler.step()`, accelerate seeing whether
        `GradScaler.step` called `optimizer.step`, as the post-hook here does). Returns the step's metrics: the
        gradient norm before clipping and, when scaling, `loss_scale` (the scale this step's backward used) and
        `step_skipped` (1.0 or 0.0)."""
        scale = self.scale
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        if not self.enabled and not math.isfinite(grad_norm):  # nothing would skip it: the weights would turn NaN
            raise FloatingPointError(f"the gradient norm is {float(grad_norm)} (the loss diverged); the step was not "
                                     f"taken: resume from the last checkpoint with a lower learning_rate")
        self._stepped = False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self._stepped:
            scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"grad_norm": float(grad_norm)}
        if self.enabled:
            metrics.update(loss_scale=scale, step_skipped=float(not self._stepped))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()  # {} when disabled

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a checkpoint's scaler; a checkpoint without one (older, or of a bf16/fp32 run) leaves it fresh."""
        if state:
            self.scaler.load_state_dict(state)
