"""Teacher-forced forward of whole GoT sequences (prompt, reasoning, image tokens) through the policy.

One pass of the language model over `[prompt | reasoning ... <begin_of_image> | image tokens[:-1]]` gives
the hidden state that predicts every generated token: text tokens through `lm_head`, image tokens through
the generation head. SFT and GRPO both train on exactly these hidden states; the heads' last linear layers
are applied by the loss (chunked), never here, so no `[T, V]` logits are built.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from engine.model_runner import unwrap


@dataclass
class GoTBatch:
    """Right-padded token layout of B GoT samples (the trainer's side of a rollout)."""

    text_ids: torch.Tensor  # [B, Lt] prompt + reasoning (ending with BOI), right-padded
    text_lens: torch.Tensor  # [B] valid length of text_ids
    prompt_lens: torch.Tensor  # [B]
    image_tokens: torch.Tensor  # [B, I]
    reasoning_ids: torch.Tensor  # [B, R] targets of the text head, right-padded with 0
    reasoning_mask: torch.Tensor  # [B, R] 1 where a reasoning token is trained

    @property
    def batch_size(self) -> int:
        return self.text_ids.shape[0]


def make_batch(prompt_ids: Sequence[Sequence[int]], reasoning_ids: Sequence[Sequence[int]],
               image_tokens: torch.Tensor, *, pad_id: int, train_mask: Sequence[Sequence[bool]] | None = None,
               device: torch.device | str = "cpu") -> GoTBatch:
    """Lay out samples for `policy_hidden`; `train_mask` can drop tokens (e.g. a forced BOI) from the loss."""
    b = len(prompt_ids)
    if not (len(reasoning_ids) == b == image_tokens.shape[0]):
        raise ValueError("prompt_ids, reasoning_ids and image_tokens must describe the same samples")
    if any(len(r) == 0 for r in reasoning_ids):
        raise ValueError("every sample needs at least its <begin_of_image> token as reasoning")
    lt = max(len(p) + len(r) for p, r in zip(prompt_ids, reasoning_ids))
    rmax = max(len(r) for r in reasoning_ids)
    text = torch.full((b, lt), pad_id, dtype=torch.long)
    targets = torch.zeros((b, rmax), dtype=torch.long)
    mask = torch.zeros((b, rmax), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, reasoning_ids)):
        text[i, : len(p) + len(r)] = torch.tensor([*p, *r])
        targets[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1.0 if train_mask is None else torch.tensor(train_mask[i], dtype=torch.float32)
    return GoTBatch(
        text_ids=text.to(device),
        text_lens=torch.tensor([len(p) + len(r) for p, r in zip(prompt_ids, reasoning_ids)], device=device),
        prompt_lens=torch.tensor([len(p) for p in prompt_ids], device=device),
        image_tokens=image_tokens.to(device),
        reasoning_ids=targets.to(device),
        reasoning_mask=mask.to(device),
    )


def image_head_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(everything of the generation head before its last linear, that last linear)."""
    head = unwrap(model).model.generation_head

    def pre(h: torch.Tensor) -> torch.Tensor:
        return head.activation_fn(head.proj_out(h))

    return pre, head.vision_head  # type: ignore[return-value]


@dataclass(frozen=True)
class Guidance:
    """Train image tokens under classifier-free guidance's mixed distribution `u + cfg_weight * (c - u)` (the one
    the engine samples them from), with the unconditional row GoT-R1 and the engine use: `[BOS, PAD ..., BOI]`
    as long as the sample's prompt and reasoning, then the same image tokens."""

    cfg_weight: float
    bos_id: int
    pad_id: int
    boi_id: int

    def unconditional(self, batch: GoTBatch) -> GoTBatch:
        text = torch.full_like(batch.text_ids, self.pad_id)
        text[:, 0] = self.bos_id
        text[torch.arange(batch.batch_size, device=text.device), batch.text_lens - 1] = self.boi_id
        return replace(batch, text_ids=text)


def policy_hidden(model: nn.Module, batch: GoTBatch,
                  guidance: Guidance | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states predicting each reasoning token `[B, R, H]` and each image token `[B, I, H]`.

    The image hidden states already went through the generation head's projection and activation, so both
    outputs pair with a plain linear head (`lm_head.weight`, `generation_head.vision_head.weight`). With
    `guidance`, the unconditional rows run in the same forward and the image states are mixed: the logits are
    affine in these states (`W s + b`), so mixing states mixes logits, `W (u + w (c - u)) + b = u' + w (c' - u')`.
    """
    if guidance is not None and guidance.cfg_weight != 1:
        b = batch.batch_size
        uncond = guidance.unconditional(batch)
        both = GoTBatch(**{f.name: torch.cat([getattr(batch, f.name), getattr(uncond, f.name)])
                           for f in fields(GoTBatch)})
        text_h, image_h = policy_hidden(model, both)
        cond, free = image_h[:b], image_h[b:]
        return text_h[:b], free + guidance.cfg_weight * (cond - free)
    janus = unwrap(model)
    lm = janus.model.language_model
    b, lt = batch.text_ids.shape
    n_img = batch.image_tokens.shape[1]
    device = batch.text_ids.device
    text_emb = lm.embed_tokens(batch.text_ids)  # [B, Lt, H]
    img_emb = janus.prepare_embeddings_for_image_generation(batch.image_tokens[:, :-1])  # [B, I-1, H]
    length = lt + n_img - 1
    rows = torch.arange(b, device=device)[:, None]
    img_pos = batch.text_lens[:, None] + torch.arange(n_img - 1, device=device)[None]
    embeds = torch.zeros(b, length, text_emb.shape[-1], dtype=text_emb.dtype, device=device)
    embeds = embeds.index_put((rows.expand(b, lt), torch.arange(lt, device=device).expand(b, lt)), text_emb)
    embeds = embeds.index_put((rows.expand_as(img_pos), img_pos), img_emb)
    attention = (torch.arange(length, device=device)[None] < (batch.text_lens + n_img - 1)[:, None]).long()
    hidden = lm(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state
    r = batch.reasoning_ids.shape[1]
    text_pos = (batch.prompt_lens[:, None] - 1 + torch.arange(r, device=device)[None]).clamp(max=length - 1)
    img_pos = batch.text_lens[:, None] - 1 + torch.arange(n_img, device=device)[None]
    pre, _ = image_head_parts(model)
    return hidden[rows, text_pos], pre(hidden[rows, img_pos])


def token_logprobs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 4096) -> torch.Tensor:
    """log_softmax(head(hidden) / temperature)[target] per token, `chunk` rows of logits at a time (fp32)."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    out = []
    for h, t in zip(flat_h.split(chunk), flat_t.split(chunk)):
        logits = head(h).float() / (temperature or 1.0)
        out.append(logits.gather(-1, t[:, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out).view(targets.shape)
