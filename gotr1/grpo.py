"""The GRPO driver: engine rollouts -> judge rewards -> group advantages -> fused loss -> optimizer step.

Thin on purpose: the engine (`engine/`) samples with the policy's own LoRA weights, the judge scores, the
advantage and loss kernels (`kernels/`) do the arithmetic. What lives here is the order of things and the
bookkeeping a run needs: parity between the engine's and the trainer's log-probs, metrics, checkpoints that
resume exactly, and data-parallel runs under torchrun.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from gotr1 import checkpoint as ckpt
from gotr1.artifacts import save_groups
from gotr1.config import GRPOConfig, sampling_params
from gotr1.data import PromptStream
from gotr1.model import JanusBundle
from gotr1.plot import plot_curves
from gotr1.policy import GoTBatch, Guidance, image_head_parts, make_batch, policy_hidden, token_logprobs
from gotr1.rewards.combine import advantage_combine
from gotr1.rewards.protocol import COMPONENTS, Judge, needs_images, reward_samples
from gotr1.training import LossScaler, add_lora, lr_scheduler

if TYPE_CHECKING:
    from engine.outputs import GroupOutput


class PolicyForward(nn.Module):
    """`policy_hidden` as a module, so DistributedDataParallel can hook the gradients of a multi-rank run."""

    def __init__(self, model: nn.Module, guidance: Guidance | None):
        super().__init__()
        self.model = model
        self.guidance = guidance

    def forward(self, batch: GoTBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return policy_hidden(self.model, batch, self.guidance)


def distributed() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (a no-op in a single process)."""
    _, world = distributed()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


STALL_WARNING_STEPS = 10  # consecutive steps with no group trained before the run says it is learning nothing


class GRPOTrainer(ckpt.Checkpointed):
    """GoT-R1's GRPO on a Janus bundle (LoRA policy, reference = the same model with the adapter disabled)."""

    def __init__(self, config: GRPOConfig, bundle: JanusBundle, prompts: Sequence[str], judge: Judge,
                 *, engine_config=None):
        from engine import EngineConfig, LLMEngine

        config.validate()
        self.config = config
        self.rank, self.world = distributed()
        if config.prompts_per_step % self.world:
            raise ValueError(f"prompts_per_step={config.prompts_per_step} must be divisible by the "
                             f"{self.world} ranks (each group stays on one rank)")
        if config.beta > 0 and not config.use_lora:
            raise ValueError("beta > 0 needs use_lora: the reference model is the policy with its adapter disabled")
        if config.scale_rewards == "batch" and self.world > 1:
            raise ValueError("scale_rewards='batch' needs rewards of all ranks; use 'group' or 'none' with torchrun")
        torch.manual_seed(config.seed)
        self.bundle = bundle
        add_lora(bundle, config)
        self.guidance = Guidance(config.cfg_weight, bundle.bos_id, bundle.pad_id, bundle.boi_id) \
            if config.image_logprobs == "guided" else None
        self.policy = PolicyForward(bundle.model, self.guidance)
        if self.world > 1:
            self.policy = nn.parallel.DistributedDataParallel(self.policy)
        self.params = [p for p in bundle.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, config, config.max_steps * config.num_iterations)
        self.loss_scaler = LossScaler(self.optimizer, self.params, config.dtype)
        self.engine = LLMEngine(bundle, engine_config or EngineConfig(
            kv_cache_memory_bytes=config.kv_cache_memory_bytes))
        self.stream = PromptStream(list(prompts), seed=config.seed)
        self.judge = judge
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.output_dir = Path(config.output_dir)

    # ---------------------------------------------------------------------------------------------- state
    def data_state(self) -> dict[str, int]:
        return self.stream.state()

    def load_data_state(self, state: dict[str, int]) -> None:
        self.stream.load_state(state)

    def save(self) -> Path | None:
        return super().save() if self.rank == 0 else None

    # ---------------------------------------------------------------------------------------------- a step
    def request_seed(self, index: int) -> int:
        """Rollout seed of the `index`-th global prompt of this step: a function of (seed, step, index) only,
        so a resumed or data-parallel run draws exactly what an uninterrupted single run draws."""
        return (self.config.seed * 1_000_003 + self.step * 10_007 + index) % (2**62)

    def rollout(self, prompts: list[str], first_index: int):
        """The step's groups; images VQ-decoded only for a judge that reads pixels (seconds a step on CPU; sample
        steps decode the group they save, in `with_images`)."""
        c = self.config
        decode = needs_images(self.judge)
        params = [sampling_params(c, n=c.num_generations, seed=self.request_seed(first_index + i), decode_images=decode)
                  for i in range(len(prompts))]
        self.bundle.model.eval()
        with torch.no_grad():
            return self.engine.generate(prompts, params, use_tqdm=False)

    def rewards(self, groups) -> torch.Tensor:
        samples = reward_samples(groups)
        breakdown = self.judge.score(samples)
        matrix = breakdown.as_matrix()
        if matrix.shape != (len(samples), len(COMPONENTS)):
            raise ValueError(f"the judge returned {tuple(matrix.shape)} rewards for {len(samples)} samples")
        self._reward_metrics = breakdown.metrics()
        return matrix

    def train_step(self) -> dict[str, Any]:
        from kernels.advantages import group_advantages

        c = self.config
        n = c.num_generations
        t0 = time.perf_counter()
        global_prompts = self.stream.take(c.prompts_per_step)
        share = c.prompts_per_step // self.world
        prompts = global_prompts[self.rank * share:(self.rank + 1) * share]
        groups = self.rollout(prompts, self.rank * share)
        self._last_groups = groups
        t1 = time.perf_counter()
        matrix = self.rewards(groups)
        t2 = time.perf_counter()
        weighted = matrix * torch.tensor(c.reward_weights, dtype=matrix.dtype)
        adv = group_advantages(weighted, n, combine=advantage_combine(c.reward_combination),
                               scale_rewards=c.scale_rewards)
        totals = adv.combined_rewards
        samples = [s for g in groups for s in g.samples]
        keep = torch.ones(len(samples), dtype=torch.bool)
        zero_var = adv.zero_std_groups
        if c.skip_zero_variance_groups and self.world == 1:  # ranks must not diverge in DDP's collectives
            keep = ~zero_var.repeat_interleave(n)
        metrics: dict[str, Any] = {
            "reward/mean": float(totals.mean()), "reward/std": float(totals.std()) if len(totals) > 1 else 0.0,
            **{f"{k}_mean": v for k, v in self._reward_metrics.items() if "unparsable" not in k},
            **{k: v for k, v in self._reward_metrics.items() if "unparsable" in k},
            **{f"reward/{name}_std": float(matrix[:, j].std()) for j, name in enumerate(COMPONENTS)},
            "advantage/mean": float(adv.advantages.mean()), "advantage/std": float(adv.advantages.std()),
            "advantage/abs_max": float(adv.advantages.abs().max()),
            "groups/zero_variance": int(zero_var.sum()), "groups/trained": int(keep.view(-1, n)[:, 0].sum()),
        }
        if keep.any():
            metrics.update(self.optimize([s for s, k in zip(samples, keep) if k], adv.advantages[keep]))
        else:  # no update, but the learning rate still follows the step count (torch warns of a skipped update)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
                for _ in range(c.num_iterations):
                    self.scheduler.step()
        if self.bundle.device.type == "cuda":  # the optimizer's kernels belong to this step's train time
            torch.cuda.synchronize(self.bundle.device)
        t3 = time.perf_counter()
        tokens = sum(len(s.reasoning_ids) + len(s.image_tokens) for s in samples)
        metrics.update({"time/rollout": t1 - t0, "time/reward": t2 - t1, "time/train": t3 - t2,
                        "time/step": t3 - t0, "tokens_per_s/rollout": tokens / max(t1 - t0, 1e-9),
                        "lr": self.scheduler.get_last_lr()[0]})
        return metrics

    def optimize(self, samples, advantages: torch.Tensor) -> dict[str, float]:
        """num_iterations x gradient-accumulated passes over the kept samples (old log-probs from pass one)."""
        from gotr1.objective import grpo_objective

        c = self.config
        device = self.bundle.device
        batch = make_batch([s.prompt_ids for s in samples], [s.reasoning_ids for s in samples],
                           torch.stack([s.image_tokens for s in samples]), pad_id=self.bundle.pad_id,
                           train_mask=[[True] * (len(s.reasoning_ids) - 1) + [not s.boi_forced] for s in samples],
                           device=device)
        advantages = advantages.to(device)
        lm_head = self.bundle.model.get_output_embeddings()
        _, vision_head = image_head_parts(self.bundle.model)
        micro = [m for m in torch.arange(len(samples)).tensor_split(c.gradient_accumulation_steps) if len(m)]
        # Left-out zero-variance groups can make the micro-batches unequal: each one counts as the share
        # len(idx) / len(samples) of the step (TRL's 1 / GA when they are equal), so that every sequence weighs the
        # same in the grpo/bnpo/dr_grpo reductions and in the averaged metrics.
        self._micro = len(micro)
        engine_text = [s.text_logprobs for s in samples]
        engine_image = torch.stack([s.image_mixed_logprobs if self.guidance else s.image_logprobs
                                    for s in samples]).to(device)
        ref = self.reference_logprobs(batch, lm_head, vision_head) if c.beta > 0 else None
        old: list[tuple[torch.Tensor, torch.Tensor]] = []
        sums: dict[str, float] = {}
        total_tokens = float(batch.reasoning_mask.sum() + batch.image_tokens.numel())
        if self.world > 1:
            t = torch.tensor([total_tokens], dtype=torch.float64)
            dist.all_reduce(t)
            total_tokens = float(t)
        self.bundle.model.train()
        for it in range(c.num_iterations):
            grad_scale = self.loss_scaler.scale  # one host read per optimizer step; 1.0 unless fp16
            for j, idx in enumerate(micro):
                sub = _select(batch, idx)
                text_h, image_h = self.policy(sub)
                loss, m, logp = grpo_objective(
                    text_h, image_h, lm_head, vision_head, sub, old_logp=old[j] if it else None,
                    ref_logp=None if ref is None else (ref[0][idx], ref[1][idx]), advantages=advantages[idx],
                    config=c, num_micro_batches=len(samples) / len(idx), total_tokens=total_tokens,
                    max_completion_length=c.max_reasoning_tokens + 1 + batch.image_tokens.shape[1], world=self.world,
                    grad_scale=grad_scale)
                self.loss_scaler.backward(loss)
                if it == 0:  # TRL's on-policy old log-probs; reused by the later iterations
                    old.append(logp)
                    self._parity(sums, logp, sub, [engine_text[i] for i in idx.tolist()], engine_image[idx])
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx) / (len(samples) * c.num_iterations)
            # grad_norm, and with fp16 loss_scale and step_skipped: means over the step's optimizer steps
            for k, v in self.loss_scaler.step(self.scheduler, c.max_grad_norm).items():
                sums[k] = sums.get(k, 0.0) + v / c.num_iterations
        self.bundle.model.eval()
        return sums

    def _parity(self, sums: dict[str, float], logp: tuple[torch.Tensor, torch.Tensor], sub: GoTBatch,
                engine_text: list[torch.Tensor], engine_image: torch.Tensor) -> None:
        """Engine vs trainer log-probs of the same (trained) tokens: the classic silent RL-rollout bug, measured."""
        lp_text, lp_img = logp
        diffs = [(lp_img - engine_image).abs().flatten()]
        for row, e in enumerate(engine_text):
            keep = sub.reasoning_mask[row, : len(e)].bool()
            diffs.append((lp_text[row, : len(e)] - e.to(lp_text.device))[keep].abs())
        d = torch.cat(diffs)
        sums["parity/logprob_diff_max"] = max(sums.get("parity/logprob_diff_max", 0.0), float(d.max()))
        sums["parity/logprob_diff_mean"] = sums.get("parity/logprob_diff_mean", 0.0) + float(d.mean()) / self._micro

    @torch.no_grad()
    def reference_logprobs(self, batch: GoTBatch, lm_head: nn.Module, vision_head: nn.Module):
        """Log-probs under the SFT model: the same weights with the LoRA adapter switched off (no second copy)."""
        with self.bundle.model.disable_adapter():
            text_h, image_h = policy_hidden(self.bundle.model, batch, self.guidance)
            return (token_logprobs(text_h, lm_head, batch.reasoning_ids, self.config.text_temperature),
                    token_logprobs(image_h, vision_head, batch.image_tokens, self.config.image_temperature))

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Run to `max_steps` (default: the config's), logging JSONL, saving checkpoints and sample images."""
        c = self.config
        end = min(max_steps or c.max_steps, c.max_steps)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.output_dir / "metrics.jsonl", "a") if self.rank == 0 else None
        bar = tqdm(total=end, initial=self.step, desc="grpo", disable=self.rank != 0)
        stalled = 0
        try:
            while self.step < end:
                metrics = all_reduce_mean(self.train_step())
                self.step += 1
                metrics["step"] = self.step
                self.history.append(metrics)
                stalled = stalled + 1 if metrics["groups/zero_variance"] * self.world == c.prompts_per_step else 0
                if stalled == STALL_WARNING_STEPS and self.rank == 0:
                    warnings.warn(
                        f"no group has had any reward variance for {stalled} steps (mean reward "
                        f"{metrics['reward/mean']:.3g}): every advantage is 0, so the reward teaches nothing. With "
                        f"reward_combination={c.reward_combination!r}, one component that is always 0 (R_RI from an "
                        f"untrained judge) zeroes every reward: check the judge's per-component means, or try "
                        f"reward_combination='sum'", RuntimeWarning, stacklevel=2)
                if log is not None and self.step % c.logging_steps == 0:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", step_s=f"{metrics['time/step']:.2f}")
                if c.sample_steps and self.step % c.sample_steps == 0 and self.rank == 0:
                    save_groups(self.output_dir / "samples" / f"step-{self.step}",
                                self.with_images(self._last_groups[:1]))
                if self.step % c.save_steps == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if self.rank == 0:
            self.plot()
        return self.history

    def with_images(self, groups: list[GroupOutput]) -> list[GroupOutput]:
        """`groups` with every sample's image, VQ-decoding the groups whose rollout left them undecoded."""
        out = []
        for g in groups:
            if any(s.image is None for s in g.samples):
                images = self.bundle.decode_images(torch.stack([s.image_tokens for s in g.samples]))
                g = dataclasses.replace(g, samples=[dataclasses.replace(s, image=im)
                                                    for s, im in zip(g.samples, images, strict=True)])
            out.append(g)
        return out

    def plot(self) -> Path:
        keys = ["reward/mean"] + [f"reward/{name}_mean" for name in COMPONENTS]
        series = {k.removeprefix("reward/"): [m.get(k, math.nan) for m in self.history] for k in keys}
        return plot_curves(series, self.output_dir / "reward_curves.png", title="GRPO rewards per step")


def _select(batch: GoTBatch, idx: torch.Tensor) -> GoTBatch:
    idx = idx.to(batch.text_ids.device)
    return GoTBatch(**{k: getattr(batch, k)[idx] for k in batch.__dataclass_fields__})
