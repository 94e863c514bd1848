"""The Hugging Face way to generate GoT samples: the engine's correctness oracle and its speed baseline.

Reasoning text comes from `generate` on the whole batch (all prompts x n samples), stopping at
`<begin_of_image>`; then the image from `JanusForConditionalGeneration.generate(generation_mode="image")`,
which re-prefills prompt + chain with its own CFG batch (unconditional rows: BOS + pads + BOI), then the VQ
decode. That is as fast as transformers allows eagerly; we keep it honest by batching everything and doing no work
twice that transformers itself does not do twice.

`compile=True` is transformers' own fast path on top: both phases decode over static KV caches, which makes
`generate` compile the reasoning's decode forward (`CompileConfig`: CUDA graphs on a GPU), and the image loop
calls its language model through `torch.compile` with the same settings. The caches are kept across calls, one
per shape (transformers would make new ones per call, whose new addresses the CUDA graphs would be recorded for
again).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList, StaticCache
from transformers.utils import logging as hf_logging

from engine.model_runner import unwrap
from gotr1.chain import ParsedChain, parse_chain
from gotr1.model import JanusBundle


@dataclass
class ReferenceSample:
    prompt: str
    prompt_ids: list[int]
    reasoning_ids: list[int]  # generated text tokens, always ending with <begin_of_image>
    boi_forced: bool
    reasoning_text: str
    chain: ParsedChain
    image_tokens: torch.Tensor  # [num_image_tokens]
    image: Image.Image | None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' generate warns about its own internal kwargs (Janus passes `guidance_scale`); hide that."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class _Progress(LogitsProcessor):
    """Ticks a progress bar once per decoding step (transformers' generate has no hook of its own)."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.bar.update(1)
        return scores


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _generation_config(bundle: JanusBundle, temperature: float, top_k: int, top_p: float, **kw) -> GenerationConfig:
    """The model's generation config with our settings, passed whole (transformers warns on config + kwargs)."""
    config = copy.deepcopy(bundle.model.generation_config)
    sampling = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}  # 0 = off
    config.update(max_length=None, min_length=None, **sampling, **kw)
    return config


class ReferenceGenerator:
    """Batched GoT generation with transformers' own `generate` (text, then image with CFG); `compile`: with a
    static cache and `torch.compile` (see the module docstring)."""

    def __init__(self, bundle: JanusBundle, compile: bool = False):
        self.bundle = bundle
        self.compile_config = None
        self._caches: dict[tuple[int, int], StaticCache] = {}
        if compile:
            cuda = bundle.device.type == "cuda"
            self.compile_config = CompileConfig(mode="reduce-overhead" if cuda else "default")
            self.compile_config._compile_all_devices = not cuda  # else transformers compiles on accelerators only
            self._compiled_lm = torch.compile(unwrap(bundle.model).model.language_model.forward,
                                              mode=self.compile_config.mode)

    def _settings(self) -> dict:
        """What `compile` adds to every generation config."""
        return {} if self.compile_config is None else {"compile_config": self.compile_config}

    def _cache(self, batch: int, length: int) -> dict:
        """`compile`: the static cache of this shape (`generate`'s `cache=`), emptied; kept across calls."""
        if self.compile_config is None:
            return {}
        cache = self._caches.get((batch, length))
        if cache is None:
            config = unwrap(self.bundle.model).config.get_text_config(decoder=True)
            cache = self._caches[(batch, length)] = StaticCache(config=config, max_cache_len=length)
        cache.reset()
        return {"cache": cache}

    @contextlib.contextmanager
    def _compiled_language_model(self):
        """The image loop calls `model.model.language_model(...)` itself: route that through `torch.compile`
        while it runs (the module is shared with the engine, so only for the call)."""
        if self.compile_config is None:
            yield
            return
        lm = unwrap(self.bundle.model).model.language_model
        previous = lm.__dict__.get("forward")
        lm.forward = self._compiled_lm
        try:
            yield
        finally:
            if previous is None:
                del lm.forward
            else:
                lm.forward = previous

    @torch.no_grad()
    def generate_reasoning(self, prompt_ids: list[list[int]], *, n: int, temperature: float, top_k: int,
                           top_p: float, max_reasoning_tokens: int, min_reasoning_tokens: int,
                           progress: bool) -> list[tuple[list[int], bool]]:
        """Reasoning for every prompt x n, prompt-major; each ends with BOI (forced at the token limit)."""
        b = self.bundle
        # Rows repeated n times rather than `num_return_sequences`: the same work, and greedy allows it.
        ids, mask = _left_pad([p for p in prompt_ids for _ in range(n)], b.pad_id, b.device)
        with _quiet_transformers(), tqdm(total=max_reasoning_tokens, desc="reference reasoning",
                                         disable=not progress, leave=False) as bar:
            config = _generation_config(b, temperature, top_k, top_p, max_new_tokens=max_reasoning_tokens,
                                        min_new_tokens=min_reasoning_tokens, eos_token_id=b.boi_id,
                                        **self._settings())
            out = b.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   logits_processor=LogitsProcessorList([_Progress(bar)]),
                                   **self._cache(ids.shape[0], ids.shape[1] + max_reasoning_tokens))
        results = []
        for row in out[:, ids.shape[1]:].tolist():
            if b.boi_id in row:
                results.append((row[: row.index(b.boi_id) + 1], False))
            else:  # every row that has not stopped ran to the limit: force the image to start
                results.append((row + [b.boi_id], True))
        return results

    @torch.no_grad()
    def generate_images(self, sequences: list[list[int]], *, temperature: float, top_k: int, top_p: float,
                        cfg_weight: float, progress: bool) -> torch.Tensor:
        """Image tokens `[len(sequences), num_image_tokens]` for full `BOS ... BOI` sequences, with CFG."""
        b = self.bundle
        if cfg_weight <= 1:
            raise ValueError(f"transformers' Janus image generate needs cfg_weight > 1, got {cfg_weight}")
        ids, mask = _left_pad(sequences, b.pad_id, b.device)
        with _quiet_transformers(), self._compiled_language_model(), tqdm(
                total=b.num_image_tokens, desc="reference image", disable=not progress, leave=False) as bar:
            config = _generation_config(b, temperature, top_k, top_p, guidance_scale=cfg_weight, **self._settings())
            return b.model.generate(input_ids=ids, attention_mask=mask, generation_mode="image",
                                    generation_config=config, logits_processor=LogitsProcessorList([_Progress(bar)]),
                                    **self._cache(2 * ids.shape[0], ids.shape[1] + b.num_image_tokens))

    def generate(self, prompts: list[str], *, n: int = 1, text_temperature: float = 1.0,
                 image_temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_weight: float = 5.0,
                 max_reasoning_tokens: int = 600, min_reasoning_tokens: int = 0, seed: int = 0,
                 decode_images: bool = True, progress: bool = False) -> list[list[ReferenceSample]]:
        """GoT samples for each prompt (outer list: prompts; inner: its n samples)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        b = self.bundle
        prompt_ids = b.encode_prompts(prompts, max_reasoning_tokens)
        torch.manual_seed(seed)
        reasoning = self.generate_reasoning(
            prompt_ids, n=n, temperature=text_temperature, top_k=top_k, top_p=top_p,
            max_reasoning_tokens=max_reasoning_tokens, min_reasoning_tokens=min_reasoning_tokens,
            progress=progress)
        sequences = [prompt_ids[i // n] + r for i, (r, _) in enumerate(reasoning)]
        tokens = self.generate_images(sequences, temperature=image_temperature, top_k=top_k, top_p=top_p,
                                      cfg_weight=cfg_weight, progress=progress)
        images = b.decode_images(tokens) if decode_images else [None] * len(sequences)
        out: list[list[ReferenceSample]] = [[] for _ in prompts]
        for i, ((r, forced), toks, image) in enumerate(zip(reasoning, tokens.cpu(), images)):
            text = b.decode_text(r)
            out[i // n].append(ReferenceSample(
                prompt=prompts[i // n], prompt_ids=prompt_ids[i // n], reasoning_ids=r, boi_forced=forced,
                reasoning_text=text, chain=parse_chain(text), image_tokens=toks, image=image))
        return out
