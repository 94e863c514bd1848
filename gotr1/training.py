"""What SFT and GRPO share: which parameters train (LoRA on the language model, or full) and the LR schedule."""
from __future__ import annotations

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
