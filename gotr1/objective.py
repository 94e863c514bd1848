"""GoT-R1's GRPO objective over a whole GoT sequence: reasoning tokens (`lm_head`) and image tokens (the
generation head's last linear), reduced together as TRL's `loss_type` says.

The fused kernel computes `sum_t w_t l_t` per head; here the weights `w_t` are chosen so that the two heads'
sums add up to one reduction over *all* tokens of a sequence (text + 576 image tokens), exactly as if the
sequence had one head: `grpo` divides by each sequence's own token count, `bnpo` by the micro-batch's,
`dr_grpo` by B x the longest possible completion, `dapo` by the active tokens of the whole step (all
micro-batches and ranks; DDP averages gradients over ranks, hence the factor `world`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gotr1.config import GRPOConfig
from gotr1.policy import GoTBatch
from kernels.grpo_loss import fused_grpo_loss


def token_weights(text_mask: torch.Tensor, num_image: int, config: GRPOConfig, *, num_micro_batches: float,
                  total_tokens: float, max_completion_length: int, world: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights `[B, R]` (text) and `[B, I]` (image) of one micro-batch, loss = sum w * l.
    `num_micro_batches`: the step's sequences over this micro-batch's (TRL's accumulation steps when the
    micro-batches are equal), so that every sequence weighs the same when they are not."""
    b = text_mask.shape[0]
    image_mask = torch.ones(b, num_image, dtype=text_mask.dtype, device=text_mask.device)
    if config.loss_type == "grpo":
        per_seq = (text_mask.sum(1, keepdim=True) + num_image) * b * num_micro_batches
        return text_mask / per_seq, image_mask / per_seq
    if config.loss_type == "bnpo":
        denom = (text_mask.sum() + image_mask.sum()) * num_micro_batches
    elif config.loss_type == "dr_grpo":
        denom = torch.tensor(float(b * max_completion_length * num_micro_batches))
    else:  # dapo: the step's active tokens, no further division by the accumulation steps
        denom = torch.tensor(total_tokens / world)
    return text_mask / denom, image_mask / denom


def grpo_objective(text_h: torch.Tensor, image_h: torch.Tensor, lm_head: nn.Linear, vision_head: nn.Linear,
                   batch: GoTBatch, *, old_logp: tuple[torch.Tensor, torch.Tensor] | None,
                   ref_logp: tuple[torch.Tensor, torch.Tensor] | None, advantages: torch.Tensor,
                   config: GRPOConfig, num_micro_batches: float, total_tokens: float, max_completion_length: int,
                   world: int = 1, grad_scale: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batch's share of the step loss, its metrics (token-weighted over both heads) and the per-token
    log-probs `([B, R], [B, I])` the loss saw. `old_logp=None` is TRL's on-policy case (ratio 1).
    Metrics are per micro-batch, to be averaged over the step's micro-batches weighted by their share of its
    sequences (`1 / num_micro_batches`, see `token_weights`): the logged `loss` is therefore the share times
    `num_micro_batches`, so that its weighted average is the step's loss (TRL logs the sum of the shares).
    `grad_scale`: the fp16 loss scaler's scale, which the fused kernel applies before it stores 16-bit gradients
    (`fused_grpo_loss`); backpropagate the loss scaled by it (`LossScaler.backward`)."""
    w_text, w_image = token_weights(batch.reasoning_mask, batch.image_tokens.shape[1], config,
                                    num_micro_batches=num_micro_batches, total_tokens=total_tokens,
                                    max_completion_length=max_completion_length, world=world)
    old_t, old_i = (None, None) if old_logp is None else old_logp
    ref_t, ref_i = (None, None) if ref_logp is None else ref_logp
    common = {"beta": config.beta, "epsilon": config.epsilon, "epsilon_high": config.epsilon_high,
              "grad_scale": grad_scale}
    loss_t, m_t = fused_grpo_loss(
        text_h, lm_head.weight, batch.reasoning_ids, old_t, ref_t, advantages, batch.reasoning_mask,
        token_weights=w_text, temperature=config.text_temperature or 1.0, bias=lm_head.bias, **common)
    loss_i, m_i = fused_grpo_loss(
        image_h, vision_head.weight, batch.image_tokens, old_i, ref_i, advantages, torch.ones_like(batch.image_tokens),
        token_weights=w_image, temperature=config.image_temperature or 1.0, bias=vision_head.bias, **common)
    n_t, n_i = float(batch.reasoning_mask.sum()), float(batch.image_tokens.numel())

    def mix(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
        return 0.0 if a is None or b is None else (float(a) * n_t + float(b) * n_i) / max(n_t + n_i, 1.0)

    loss = loss_t + loss_i
    metrics = {"loss": loss.item() * num_micro_batches, "kl": mix(m_t.kl, m_i.kl),
               "ratio_mean": mix(m_t.ratio_mean, m_i.ratio_mean),
               "clip_ratio/low_mean": mix(m_t.clip_ratio_low, m_i.clip_ratio_low),
               "clip_ratio/high_mean": mix(m_t.clip_ratio_high, m_i.clip_ratio_high),
               "clip_ratio/region_mean": mix(m_t.clip_ratio_region, m_i.clip_ratio_region)}
    return loss, metrics, (m_t.logp, m_i.logp)
