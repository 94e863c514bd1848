"""The engine's side of sampling: per-row settings as tensors, the GoT rules on `<begin_of_image>`, and one
`kernels.cfg_sampling.cfg_sample` call for the text rows and one for the image pairs of a step.

Settings are checked once, by `SamplingParams`, so the kernel's per-step value checks (a device sync) are off.
Results stay on the device, as the kernel wrote them (no per-step casts or stacks): the engine stacks a whole
(multi-)step window's tokens and log-probs once, at its end, and brings them to the host in one copy.
Random numbers are counter-based: row r draws from (its sample's key, the position of the token it samples),
so a sample's tokens are the same whatever else shares its batch, and after preemption and recompute.
"""
from __future__ import annotations

import torch

from engine.model_runner import host_tensor
from engine.sequence import Sample
from kernels.cfg_sampling import SampleOutput, cfg_sample


class Sampler:
    def __init__(self, boi_id: int, device: torch.device):
        self.boi_id = boi_id
        self.device = device
        # Per phase: the samples of the last step and their fixed settings as tensors. Consecutive decode steps
        # usually sample the same rows, so only the counters (token positions) are sent again.
        self._fixed: dict[bool, tuple[tuple[Sample, ...], dict[str, torch.Tensor]]] = {}

    def _settings(self, samples: list[Sample], image: bool, step: int) -> dict[str, torch.Tensor]:
        """The rows' settings as tensors: the fixed ones (two host-to-device copies, one float, one int) when the
        rows changed since the last step of this phase, and the counters (step `step` of a multi-step batch
        samples each row's token one position further than the host's rows say)."""
        rows = tuple(samples)
        cached = self._fixed.get(image)
        if cached is None or cached[0] != rows:
            floats, ints = [], []
            for s in samples:
                p = s.group.params
                floats += (p.cfg_weight if image else 1.0, p.image_temperature if image else p.text_temperature,
                           p.top_p)
                ints += (p.top_k, s.key)
            # Each setting contiguous (not a column view): the CPU sampling kernel reads seeds as a plain array.
            cfg_weight, temperature, top_p = host_tensor(floats, torch.float32, self.device).view(-1, 3).T.contiguous()
            top_k, seeds = host_tensor(ints, torch.int64, self.device).view(-1, 2).T.contiguous()
            cached = self._fixed[image] = rows, dict(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k,
                                                     top_p=top_p, seeds=seeds)
        counters = host_tensor([len(s.cond) + step for s in samples], torch.int64, self.device)
        return dict(cached[1], counters=counters)

    @torch.inference_mode()
    def text_tensors(self, logits: torch.Tensor, samples: list[Sample], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One reasoning token per row, left on the device: tokens (int64) and log-probs (fp32). `<begin_of_image>`
        is banned below `min_reasoning_tokens` and forced at `max_reasoning_tokens`; the log-prob reported for
        those rows is still the policy's own, `log_softmax(logits / T)[token]`, the quantity a teacher-forced
        forward gives the GRPO loss."""
        settings = self._settings(samples, image=False, step=step)
        banned = [i for i, s in enumerate(samples) if s.suppress_boi(step)]
        forced = [i for i, s in enumerate(samples) if s.force_boi(step)]
        raw = logits
        if banned:
            logits = logits.clone()
            column = logits[:, self.boi_id]
            if len(banned) == len(samples):
                column.fill_(float("-inf"))
            else:
                column.index_fill_(0, host_tensor(banned, torch.int64, self.device), float("-inf"))
        out = cfg_sample(logits, None, validate=False, **settings)
        tokens, logprobs = out.tokens, out.logprobs
        if forced:
            tokens = tokens.index_fill(0, host_tensor(forced, torch.int64, self.device), self.boi_id)
        if banned or forced:
            # The policy's log-probs on the raw logits; a group in lock-step has every row banned or forced.
            every = len(banned) + len(forced) == len(samples)
            rows = None if every else host_tensor(banned + forced, torch.int64, self.device)

            def pick(x: torch.Tensor) -> torch.Tensor:
                return x if every else x.index_select(0, rows)

            t = pick(settings["temperature"])
            t = torch.where(t == 0, 1.0, t)[:, None]
            policy = torch.log_softmax(pick(raw).float() / t, dim=-1).gather(1, pick(tokens)[:, None])[:, 0]
            logprobs = policy if every else logprobs.index_copy(0, rows, policy)
        return tokens, logprobs

    def paired_rows(self, samples: list[Sample]) -> torch.Tensor:
        """Indices of the samples that have an unconditional row, in the order of the step's `uncond_rows`."""
        return host_tensor([i for i, s in enumerate(samples) if s.uncond is not None], torch.int64, self.device)

    @torch.inference_mode()
    def image_tensors(self, cond: torch.Tensor, uncond: torch.Tensor | None, samples: list[Sample], step: int,
                      paired: torch.Tensor | None) -> SampleOutput:
        """One image token per sample, sampled from `u + w (c - u)`, left on the device: tokens (int64), log-probs
        of the conditional logits and of the mixed logits (fp32).

        `uncond` holds the rows of the samples that have one, in order (None: no sample has); when only some have
        one, `paired` is `paired_rows(samples)`. In such a step a sample without one is paired with its own
        conditional logits: `c == u` mixes to `c` exactly, as the unpaired kernel path does, and keeps one kernel
        call per step."""
        if uncond is not None and uncond.shape[0] < len(samples):
            uncond = cond.index_copy(0, paired, uncond)
        return cfg_sample(cond, uncond, validate=False, **self._settings(samples, image=True, step=step))
