"""`LLMEngine`: GoT rollouts (reasoning, then CFG image tokens) with continuous batching over a paged KV cache.

nano-vllm's loop — `schedule -> run -> sample -> postprocess` — with Janus's two phases in one batch, and vLLM's
multi-step decoding: a decode batch runs up to `num_scheduler_steps` steps (`num_image_scheduler_steps` when its
rows are all drawing images), each step's tokens fed to the next on the device, so the host syncs once per window
rather than once per token and can queue steps while the device computes. The model is the policy itself: the engine
keeps no copy of any weight, so the rollout after an optimizer step samples from the updated policy. Update weights
between rollouts (when `has_unfinished()` is False): the shared unconditional prefix KV is recomputed for each
rollout, not for each weight change in the middle of one.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_runner import ModelRunner, host_tensor
from engine.outputs import GroupOutput, SampleOutput
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Group, Sample, Sequence, sample_key
from gotr1.chain import parse_chain
from gotr1.model import JanusBundle


class LLMEngine:
    def __init__(self, model: JanusBundle, config: EngineConfig | None = None):
        """`model`: a `JanusBundle` whose `.model` is Janus or a peft model wrapping it (LoRA applied inline)."""
        if not isinstance(model, JanusBundle):
            raise TypeError(f"LLMEngine needs a JanusBundle (model + tokenizer + special ids), got "
                            f"{type(model).__name__}; wrap a model with gotr1.model.JanusBundle")
        self.bundle = model
        self.config = config or EngineConfig()
        self.runner = ModelRunner(model.model, self.config)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.config, self.block_manager, bos_id=model.bos_id, pad_id=model.pad_id,
                                   boi_id=model.boi_id)
        self.sampler = Sampler(model.boi_id, self.runner.device)
        self.num_image_tokens = model.num_image_tokens
        self._request_ids = itertools.count()
        self.peak_used_blocks = 0  # statistics: KV blocks held at the busiest step, steps run
        self.num_steps = 0

    # ------------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: str, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one prompt (its `params.n` samples); returns its request id."""
        params = params or SamplingParams()
        prompt_ids = self.bundle.encode_prompts([prompt], params.max_reasoning_tokens)[0]
        return self._add(prompt, prompt_ids, params, request_id)

    def _add(self, prompt: str, prompt_ids: list[int], params: SamplingParams, request_id: str | None) -> str:
        if not self.scheduler.has_unfinished():
            self.runner.bind(self.bundle.model)  # the model may have been wrapped or merged since
        if request_id is None:  # the next number no caller-chosen id holds
            request_id = next(i for i in map(str, self._request_ids) if i not in self.scheduler.groups)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        group = Group(request_id=request_id, prompt=prompt, prompt_ids=prompt_ids, params=params, seed=seed,
                      num_image_tokens=self.num_image_tokens)
        if group.max_len > self.runner.max_model_len:
            raise ValueError(f"request {request_id!r} needs up to {group.max_len} positions, the engine's "
                             f"max_model_len is {self.runner.max_model_len}")
        group.samples = [Sample(group=group, index=i, key=sample_key(seed, i), cond=Sequence(list(prompt_ids)))
                         for i in range(params.n)]
        self.scheduler.add(group)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop an unfinished request and free its KV blocks."""
        self.scheduler.abort(request_id)

    def progress(self, request_id: str) -> list[tuple[list[int], int]]:
        """Per sample of an unfinished request: its reasoning ids so far (ending with `<begin_of_image>` once the
        image phase began) and its image-token count, so a server can stream a request before it finishes."""
        group = self.scheduler.groups.get(request_id)
        if group is None:
            raise KeyError(f"no unfinished request {request_id!r}")
        return [(s.reasoning_ids, s.num_image_tokens) for s in group.samples]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------------------ stepping
    def step(self, interrupt: Callable[[], bool] | None = None) -> list[GroupOutput]:
        """One scheduled batch: a prefill, or a decode step, or `num_steps` decode steps back to back; returns the
        requests that finished with it. `interrupt`, asked on the host before each further step of a window, ends
        the window early when it returns True: a server passes "a request arrived", so the request's prefill
        waits for one step, not for the rest of the window."""
        batch = self.scheduler.schedule()
        if not batch.seqs:  # nothing unfinished (idle, or the last request was just aborted)
            return []
        self.peak_used_blocks = max(self.peak_used_blocks, self.block_manager.num_used_blocks)
        return [self._output(g) for g in self._run(batch, interrupt)]

    @torch.inference_mode()
    def _run(self, batch: ScheduledBatch, interrupt: Callable[[], bool] | None = None) -> list[Group]:
        """Forward and sample each step of the batch. The tokens one step samples are the next step's inputs
        without leaving the device (an image token feeds its conditional and its unconditional row), so the host
        queues every step; at the end it stacks the window's tokens and log-probs (no per-step casts or copies),
        reads them in one copy, and appends each sample's in one go."""
        text_samples, image_samples = batch.text_samples, batch.image_samples
        paired = None
        if 0 < len(batch.uncond_rows) < len(image_samples):
            paired = self.sampler.paired_rows(image_samples)
        order = self._feed_order(batch) if batch.num_steps > 1 else None
        ids = None
        # per step: tokens [text, image] and log-probs [text, image conditional, image mixed], the kinds it has
        tokens: list[list[torch.Tensor]] = []
        logprobs: list[list[torch.Tensor]] = []
        for step in range(batch.num_steps):
            text_logits, cond, uncond = self.runner.run(batch, step, ids)
            toks, lps = [], []
            if text_logits is not None:
                tok, lp = self.sampler.text_tensors(text_logits, text_samples, step)
                toks.append(tok)
                lps.append(lp)
            if cond is not None:
                out = self.sampler.image_tensors(cond, uncond, image_samples, step, paired)
                toks.append(out.tokens)
                lps += (out.logprobs, out.mixed_logprobs)
            tokens.append(toks)
            logprobs.append(lps)
            if step + 1 < batch.num_steps:
                if interrupt is not None and interrupt():
                    break
                feed = list(toks)
                if batch.uncond_rows:
                    feed.append(toks[-1] if paired is None else toks[-1].index_select(0, paired))
                ids = torch.cat(feed) if len(feed) > 1 else feed[0]
                ids = ids if order is None else ids.index_select(0, order)
        self.num_steps += len(tokens)
        num_text, num_image = len(text_samples), len(image_samples)
        token_columns: list[list[int]] = []
        logprob_columns: list[list[float]] = []
        if num_text + num_image:  # (a batch that only grows the shared unconditional prefix samples nothing)
            # [steps, text + image] int64 and [steps, text + 2 image] fp32, read in one copy, the window's one
            # device sync: the tokens (< 2**31) as int32 beside the log-probs' bits
            toks = torch.cat([torch.stack(kind) for kind in zip(*tokens)], 1)
            lps = torch.cat([torch.stack(kind) for kind in zip(*logprobs)], 1)
            host = torch.cat([toks.int(), lps.view(torch.int32)], 1).cpu()
            token_columns = host[:, :toks.shape[1]].T.tolist()
            logprob_columns = host[:, toks.shape[1]:].view(torch.float32).T.tolist()
            _check_finite(logprob_columns, text_samples, image_samples)
        finished = self.scheduler.postprocess(
            batch, token_columns[:num_text], logprob_columns[:num_text], token_columns[num_text:],
            logprob_columns[num_text:num_text + num_image], logprob_columns[num_text + num_image:])
        if len(tokens) < batch.num_steps:
            self.scheduler.cut_window(batch)
        return finished

    def _feed_order(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Where each row's next input sits in `[text tokens, image tokens, image tokens of the unconditional
        rows]` (None: in row order already, as in an image-only step)."""
        order = [0] * len(batch.seqs)
        for i, row in enumerate(batch.text_rows + batch.cond_rows + batch.uncond_rows):
            order[row] = i
        if order == list(range(len(order))):
            return None
        return host_tensor(order, torch.int64, self.runner.device)

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[GroupOutput]:
        """GoT samples for every prompt, in prompt order. The model runs in eval mode meanwhile (LoRA dropout
        off); each module's train/eval mode is restored afterwards."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        params = params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        if self.scheduler.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; finish or abort the requests added with "
                               "add_request() first")
        # Encode everything first: a bad prompt fails before any request is queued.
        encoded = [self.bundle.encode_prompts([p], sp.max_reasoning_tokens)[0] for p, sp in zip(prompts, params_list)]
        outputs: dict[str, GroupOutput] = {}
        ids = []
        with _eval_mode(self.bundle.model):
            try:
                for prompt, prompt_ids, sp in zip(prompts, encoded, params_list):
                    ids.append(self._add(prompt, prompt_ids, sp, None))
                with tqdm(total=len(ids), desc="rollout", disable=not use_tqdm) as bar:
                    while self.scheduler.has_unfinished():
                        for out in self.step():
                            outputs[out.request_id] = out
                            bar.update(1)
            finally:
                for rid in ids:
                    if rid in self.scheduler.groups:
                        self.scheduler.abort(rid)
        return [outputs[rid] for rid in ids]

    # ------------------------------------------------------------------------------------------------ outputs
    def _output(self, group: Group) -> GroupOutput:
        b = self.bundle
        tokens = torch.tensor([s.image_token_ids for s in group.samples], dtype=torch.int64)
        images = b.decode_images(tokens) if group.params.decode_images else [None] * len(group.samples)
        samples = []
        for s, toks, image in zip(group.samples, tokens, images):
            text = b.decode_text(s.reasoning_ids)
            samples.append(SampleOutput(
                prompt_ids=list(group.prompt_ids), reasoning_ids=s.reasoning_ids, boi_forced=s.boi_forced,
                reasoning_text=text, chain=parse_chain(text), image_tokens=toks, image=image,
                text_logprobs=torch.tensor(s.text_logprobs, dtype=torch.float32),
                image_logprobs=torch.tensor(s.image_logprobs, dtype=torch.float32),
                image_mixed_logprobs=torch.tensor(s.image_mixed_logprobs, dtype=torch.float32)))
        return GroupOutput(request_id=group.request_id, prompt=group.prompt, samples=samples)

    @property
    def kv_bytes_used_peak(self) -> int:
        return self.peak_used_blocks * self.runner.block_bytes


def _check_finite(logprobs: list[list[float]], text_samples: list[Sample], image_samples: list[Sample]) -> None:
    """NaN logits (weights a diverged update left non-finite, or a 16-bit overflow) would otherwise yield
    tokens that depend on the sampling path and NaN log-probs for the GRPO loss: refuse them by name. `logprobs`
    holds a window's columns, one per text row, then two per image row (conditional, CFG-mixed); a NaN anywhere
    makes a column's sum NaN (log-probs are at most 0: no inf - inf)."""
    nan = [math.isnan(sum(column)) for column in logprobs]
    if any(nan):
        bad = [s for s, b in zip(text_samples + image_samples * 2, nan, strict=True) if b]
        ids = sorted({s.group.request_id for s in bad})
        raise FloatingPointError(f"the model's logits are NaN for request(s) {ids}: its weights or activations are "
                                 "not finite (a diverged update, or an overflow in 16 bits)")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
