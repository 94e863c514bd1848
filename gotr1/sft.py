"""Supervised GoT training on (prompt, chain, image) triples: GoT-R1's stage before GRPO.

Images become codebook ids through the model's own VQ encoder; the loss is cross-entropy on the chain's
text tokens (ending with `<begin_of_image>`) plus the image tokens, through the same teacher-forced forward
GRPO uses (`gotr1.policy`). LoRA or full fine-tuning; checkpoints in the GRPO format; the final model is
exported merged, with its processor, so `--model DIR` loads it like any Janus checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from engine.model_runner import unwrap
from gotr1 import checkpoint as ckpt
from gotr1.config import SFTConfig
from gotr1.data import epoch_order
from gotr1.model import JanusBundle, encode_images, save_bundle
from gotr1.plot import plot_curves
from gotr1.policy import image_head_parts, make_batch, policy_hidden, token_logprobs
from gotr1.training import LossScaler, add_lora, lr_scheduler


@dataclass
class SFTExample:
    prompt: str
    chain: str  # the reasoning text as the model should write it (prose + GoT tags), without <begin_of_image>
    image_tokens: torch.Tensor  # [num_image_tokens] codebook ids


def read_sft_jsonl(path: str | Path, bundle: JanusBundle) -> list[SFTExample]:
    """JSONL lines `{"prompt", "chain", "image"}` (image: a path relative to the file) -> encoded examples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON: {e}") from e
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object with prompt, chain and image, got {line[:80]!r}")
        missing = [k for k in ("prompt", "chain", "image") if not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: missing string fields {missing}")
        image = path.parent / r["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{n}: image {image} does not exist")
        rows.append(r)
    if not rows:
        raise ValueError(f"SFT data file {path} holds no examples")
    vq, chunks = unwrap(bundle.model).model.vqmodel, []
    # A batch of files open at a time: a data set may hold more than ulimit -n.
    for i in tqdm(range(0, len(rows), 64), desc="VQ-encoding images", unit="batch"):
        with contextlib.ExitStack() as files:
            images = [files.enter_context(Image.open(path.parent / r["image"])) for r in rows[i:i + 64]]
            chunks.append(encode_images(vq, images))
    return [SFTExample(r["prompt"], r["chain"], c) for r, c in zip(rows, torch.cat(chunks))]


class SFTTrainer(ckpt.Checkpointed):
    """Cross-entropy on chain text + image tokens; batches reshuffled each epoch with `seed + epoch`."""

    def __init__(self, config: SFTConfig, bundle: JanusBundle, examples: Sequence[SFTExample]):
        config.validate()
        if not examples:
            raise ValueError("no SFT examples")
        n_img = bundle.num_image_tokens
        bad = [i for i, e in enumerate(examples) if e.image_tokens.shape != (n_img,)]
        if bad:
            raise ValueError(f"examples {bad[:5]} do not have {n_img} image tokens")
        self.config, self.bundle, self.examples = config, bundle, list(examples)
        torch.manual_seed(config.seed)
        add_lora(bundle, config)
        self.params = [p for p in bundle.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, config, config.max_steps)
        self.loss_scaler = LossScaler(self.optimizer, self.params, config.dtype)
        self.prompt_ids = bundle.encode_prompts([e.prompt for e in examples], max_reasoning_tokens=0)
        self.reasoning_ids = [bundle.tokenizer(e.chain, add_special_tokens=False)["input_ids"] + [bundle.boi_id]
                              for e in examples]
        for i, (p, r) in enumerate(zip(self.prompt_ids, self.reasoning_ids)):  # as `encode_prompts` checks rollouts
            if len(p) + len(r) + n_img > bundle.max_positions:
                raise ValueError(f"example {i}: prompt {len(p)} + chain {len(r)} (with <begin_of_image>) + {n_img} "
                                 f"image tokens > the model's {bundle.max_positions} positions")
        self.step, self.epoch, self.position = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.output_dir = Path(config.output_dir)

    def _order(self) -> list[int]:
        return epoch_order(len(self.examples), self.config.seed, self.epoch)

    def next_batch(self) -> list[int]:
        bs, order = self.config.per_device_train_batch_size, self._order()
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order()
        idx = order[self.position:self.position + bs]
        self.position += bs
        return idx

    def loss(self, idx: list[int], window: list[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the token-mean cross-entropy over `window` (the examples of every
        micro-batch the step accumulates; default: `idx` alone), so the shares sum to the window's loss."""
        window = idx if window is None else window
        b = self.bundle
        batch = make_batch([self.prompt_ids[i] for i in idx], [self.reasoning_ids[i] for i in idx],
                           torch.stack([self.examples[i].image_tokens for i in idx]), pad_id=b.pad_id,
                           device=b.device)
        text_h, image_h = policy_hidden(b.model, batch)
        _, vision_head = image_head_parts(b.model)
        text_lp = token_logprobs(text_h, b.model.get_output_embeddings(), batch.reasoning_ids)
        image_lp = token_logprobs(image_h, vision_head, batch.image_tokens)
        text_ce = -(text_lp * batch.reasoning_mask).sum() / sum(len(self.reasoning_ids[i]) for i in window)
        image_ce = -image_lp.sum() / (len(window) * image_lp.shape[1])
        loss = self.config.text_loss_weight * text_ce + self.config.image_loss_weight * image_ce
        return loss, {"loss": loss.item(), "loss/text": text_ce.item(), "loss/image": image_ce.item()}

    def train(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        c = self.config
        end = min(max_steps or c.max_steps, c.max_steps)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.bundle.model.train()
        with open(self.output_dir / "metrics.jsonl", "a") as log, \
                tqdm(total=end, initial=self.step, desc="sft") as bar:
            while self.step < end:
                start = time.perf_counter()
                sums: dict[str, float] = {}
                micro = [self.next_batch() for _ in range(c.gradient_accumulation_steps)]
                window = [i for idx in micro for i in idx]
                for idx in micro:
                    loss, m = self.loss(idx, window)
                    self.loss_scaler.backward(loss)
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v
                sums.update(self.loss_scaler.step(self.scheduler, c.max_grad_norm))
                self.step += 1
                sums.update(step=self.step, epoch=self.epoch, lr=self.scheduler.get_last_lr()[0],
                            time_step=time.perf_counter() - start)
                self.history.append(sums)
                if self.step % c.logging_steps == 0:
                    log.write(json.dumps(sums) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.3f}")
                if self.step % c.save_steps == 0 or self.step == end:
                    self.save()
        self.bundle.model.eval()
        plot_curves({k: [h[k] for h in self.history] for k in ("loss", "loss/text", "loss/image")},
                    self.output_dir / "loss_curves.png", title="SFT loss per step")
        return self.history

    def data_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_data_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def merged(self) -> JanusBundle:
        """The bundle with any LoRA adapter merged into the base weights (training cannot continue after)."""
        model = self.bundle.model
        self.bundle.model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        return self.bundle

    def export(self, path: str | Path) -> Path:
        """The trained model, LoRA merged, with its processor: a plain Janus directory for `--model DIR`."""
        save_bundle(self.merged(), path)
        return Path(path)
