"""`QwenVLJudge`: GoT-R1's reward judge (Qwen2.5-VL) behind the `Judge` protocol, batched for a whole GRPO step.

One `score` call prepares every picture once (each sample's generated image, serving R_PI and all of its grounding
queries, and its layout canvas for R_spa), then:

* `expected` mode (default): one forward per (sample, rubric) prompt that ends with the forced answer prefix
  `{"score": ` plus the token "1"; the logits at the last two positions give the score's distribution (see
  `parsing.expected_score`). No decoding. Prompts are left-padded into fixed (batch, length) buckets, and on CUDA
  every bucket's forward is a CUDA graph.
* `generate` mode (the paper's way): greedy decoding of a short JSON answer, then `parsing.parse_score`.
* R_RI always decodes: "Locate the {object} ..." for every planned object, greedy and batched; the box is read in
  the judge's pixel frame and mapped to 0..1000 (`geometry`).

Decoding runs in the same (batch, length) buckets: the prompt is prefilled eagerly into a static KV cache of the
bucket (`batching.DecodeCaches`: one memory arena for every bucket), and on CUDA each decode step of the bucket is
one CUDA graph (language model, head and argmax) that writes its keys and values at the position it is given.
The vision tower, embedding lookup and Qwen's 3-D rotary positions (transformers' own `get_rope_index`) run
eagerly; only the language model and the read-outs are in the graphs. Decoding applies the model's repetition
penalty (Qwen2.5-VL-7B-Instruct's generation_config: 1.05) as transformers' and vLLM's `generate` do, so the judge
answers what their users get.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from gotr1.chain import render_layout
from gotr1.model import check_model_dir, seeded_random_model
from gotr1.rewards.batching import (
    DEFAULT_SEQ_BUCKETS,
    DecodeCaches,
    GraphedForward,
    causal_padding_mask,
    left_pad,
    plan_batches,
    seek,
)
from gotr1.rewards.geometry import judge_frame, judge_to_got, mean_iou
from gotr1.rewards.parsing import expected_score, parse_box, parse_score, scale_score
from gotr1.rewards.prompts import ANSWER_PREFIX, GROUNDING, IMAGE_SLOT, RUBRICS, Rubric, chat
from gotr1.rewards.protocol import COMPONENTS, RewardBreakdown, RewardSample

JUDGE_PRESETS = ("tiny-qwen", "qwen2.5-vl-7b-shape")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
# Qwen2's pre-tokenizer split: one token per digit, which expected-mode scoring relies on.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
MAX_REASONING_CHARS = 4000  # a 600-token chain is ~2.5k characters; longer text is cut so prompts stay bounded
DIGITS = tuple(str(d) for d in range(10))


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor, whose base class needs torchvision (not installable
    here without pulling a CUDA torch); image processing falls back to the PIL backend. Saves and loads."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    @property
    def video_processor(self) -> None:
        return None

    @video_processor.setter
    def video_processor(self, value) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- presets
_CORPUS = (
    "a an the of and with on in to is are at its left right above below top bottom next near behind front "
    "red green blue yellow purple orange black white gray pink brown circle square triangle star cat dog bird car "
    "tree house person table chair cup bowl apple banana one two three four small large round wooden metal glass "
    "image picture photo scene background sky grass water wall floor bright dark"
).split()


def build_tiny_qwen_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's pre-tokenizer (digits are single tokens) and special tokens, trained offline
    on the judge's own prompts: deterministic, no download, any text encodes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    captions = [" ".join(_CORPUS[i:i + 7]) for i in range(0, len(_CORPUS), 3)]
    corpus = [chat(r.template.format(prompt=c, reasoning=c), image=r.image is not None, answer_prefix=ANSWER_PREFIX)
              for r in RUBRICS for c in captions[:4]]
    corpus += [chat(GROUNDING.format(object=w), image=True) for w in _CORPUS[40:60]]
    corpus += [f'{{"score": {s}}}' for s in range(11)] + captions
    corpus += [f'```json\n[\n\t{{"bbox_2d": [{x}, {y}, {x + 97}, {y + 131}], "label": "{w}"}}\n]\n```'
               for x, y, w in zip(range(0, 300, 13), range(5, 400, 17), _CORPUS)]
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    tok.padding_side = "left"
    return tok


@lru_cache(maxsize=1)
def _cached_tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_qwen_tokenizer()


def _token_ids(tokenizer) -> dict[str, int]:
    return {"image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>")}


def tiny_qwen_config(tokenizer, *, hidden_size: int = 64, num_layers: int = 2) -> Qwen2_5_VLConfig:
    """The smallest Qwen2.5-VL that keeps the real geometry (patch 14, merge 2, windowed + full vision blocks).

    Weights are drawn wider than the default (std 0.2, not 0.02) so that different inputs get visibly different
    scores: tests comparing batched and single scores must be able to tell samples apart.
    """
    vocab = -(-len(tokenizer) // 64) * 64
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], initializer_range=0.2),
        tie_word_embeddings=True, **_token_ids(tokenizer))


def qwen7b_shape_config(tokenizer) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's dimensions (its HF config.json), token ids from `tokenizer`, for benchmarks."""
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        tie_word_embeddings=False, **_token_ids(tokenizer))


# ------------------------------------------------------------------------------------------------------ judge
@dataclass
class JudgeConfig:
    """How the judge runs; none of it changes what a score means except `mode` (and `image_size`, what it sees)."""

    mode: Literal["expected", "generate"] = "expected"
    image_size: int = 392  # every picture is resized to this square (a multiple of 28): Janus's 384 px -> 392
    max_batch_size: int = 32  # rows per forward (scoring and decoding)
    seq_buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS
    vision_batch_size: int = 16  # pictures per vision-tower call
    max_new_tokens_score: int = 20  # generate mode: `{"score": 10}` in a code fence is ~10 Qwen tokens
    max_new_tokens_box: int = 40  # grounding: `[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]` in a fence
    cuda_graphs: bool = True  # capture the scoring forward and decode step per bucket (CUDA only; eager elsewhere)
    # decoding only, transformers' RepetitionPenaltyLogitsProcessor; None: the model's generation_config (1.0 if unset)
    repetition_penalty: float | None = None

    def validate(self, merge_factor: int) -> None:
        problems = [msg for msg, ok in {
            f"mode must be 'expected' or 'generate', got {self.mode!r}": self.mode in ("expected", "generate"),
            f"image_size must be a positive multiple of {merge_factor}, got {self.image_size}":
                self.image_size > 0 and self.image_size % merge_factor == 0,
            "max_batch_size must be >= 1": self.max_batch_size >= 1,
            "vision_batch_size must be >= 1": self.vision_batch_size >= 1,
            "seq_buckets must be increasing positive lengths":
                len(self.seq_buckets) > 0 and all(a < b for a, b in zip((0, *self.seq_buckets), self.seq_buckets)),
            "max_new_tokens_score and max_new_tokens_box must be >= 1":
                self.max_new_tokens_score >= 1 and self.max_new_tokens_box >= 1,
            f"repetition_penalty must be None or a finite number > 0, got {self.repetition_penalty!r}":
                self.repetition_penalty is None or _valid_penalty(self.repetition_penalty),
        }.items() if not ok]
        if problems:
            raise ValueError("invalid JudgeConfig: " + "; ".join(problems))


def _valid_penalty(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class JudgeRequest:
    """One chat turn for the judge: its token ids (image placeholders expanded) and the picture it shows."""

    ids: list[int]
    image: int | None  # index into PreparedBatch.features


@dataclass
class PreparedBatch:
    """The samples with every picture encoded once: features[2*i] is sample i's image, features[2*i+1] its layout."""

    samples: Sequence[RewardSample]
    features: list[torch.Tensor]
    grids: torch.Tensor  # [2B, 3] (t, h, w) in patches, as the image processor returned them


class QwenVLJudge:
    """GoT-R1's Qwen2.5-VL judge; see the module docstring. `score` is the `Judge` protocol."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, processor: ImageOnlyQwenProcessor,
                 config: JudgeConfig | None = None, name: str = "qwen"):
        self.model, self.processor, self.name = model.eval(), processor, name
        self.config = config or JudgeConfig()
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        vision = model.config.vision_config
        self.patch_size, self.merge = vision.patch_size, vision.spatial_merge_size
        self.config.validate(self.patch_size * self.merge)
        text = model.config.text_config
        if set(text.layer_types) != {"full_attention"}:
            raise ValueError(f"{name}: sliding-window layers {sorted(set(text.layer_types))} are not supported")
        tok = self.tokenizer
        missing = [t for t in QWEN_SPECIALS if t not in tok.get_vocab()]
        if missing:
            raise ValueError(f"{name}: tokenizer lacks Qwen's special tokens {missing}: not a Qwen2.5-VL tokenizer")
        self.image_token_id = model.config.image_token_id
        if tok.convert_tokens_to_ids("<|image_pad|>") != self.image_token_id:
            raise ValueError(f"{name}: tokenizer's <|image_pad|> is not the model's image_token_id "
                             f"{self.image_token_id}")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        self.stop_ids = sorted({tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})
        self.digit_ids = self._check_digits()
        self.repetition_penalty = self._check_repetition_penalty()
        specials = sorted({t.content for t in tok.added_tokens_decoder.values()} | set(QWEN_SPECIALS), key=len,
                          reverse=True)
        self._specials_re = re.compile("|".join(map(re.escape, specials)))
        self.image_tokens = self._check_image_size()
        self.text_model = model.model.language_model
        self._digits_dev = torch.tensor(self.digit_ids, device=self.device)
        use_graphs = self.config.cuda_graphs and self.device.type == "cuda"
        self._scorer = GraphedForward(self._score_forward, use_graphs=use_graphs)
        self._decoder = GraphedForward(self._decode_step, use_graphs=use_graphs)
        self._decode_caches = DecodeCaches(self.text_model.config, model.dtype, self.device, self._decoder.reset)
        self._stop_dev = torch.tensor(self.stop_ids, device=self.device)
        # work done so far, for throughput logs and benchmarks
        self.counters = dict.fromkeys(("pictures", "score_rows", "score_forwards", "decode_rows", "decode_steps"), 0)

    # -- start-up checks: a judge that cannot score must fail here, not mid-training
    def _check_digits(self) -> list[int]:
        tok = self.tokenizer
        head = chat("x", image=False, answer_prefix=ANSWER_PREFIX)
        base = tok(head, add_special_tokens=False)["input_ids"]
        ids = []
        for d in DIGITS:
            if tok(d, add_special_tokens=False)["input_ids"] != [tok.convert_tokens_to_ids(d)]:
                raise ValueError(f"{self.name}: digit {d!r} is not a single token; expected-mode scoring needs "
                                 "Qwen's one-token-per-digit tokenizer")
            ids.append(tok.convert_tokens_to_ids(d))
        for answer in ("7", "10"):
            if tok(head + answer, add_special_tokens=False)["input_ids"] != base + [ids[int(c)] for c in answer]:
                raise ValueError(f"{self.name}: the tokenizer merges the answer prefix {ANSWER_PREFIX!r} with the "
                                 f"score {answer!r}; expected-mode scoring reads the score right after the prefix")
        return ids

    def _check_repetition_penalty(self) -> float:
        """The configured penalty, else the model's generation_config's (read once, here), else 1.0: what
        transformers' `generate` applies."""
        if self.config.repetition_penalty is not None:
            return float(self.config.repetition_penalty)
        value = getattr(self.model.generation_config, "repetition_penalty", None)
        if value is None:
            return 1.0
        if not _valid_penalty(value):
            raise ValueError(f"{self.name}: generation_config.repetition_penalty must be a finite number > 0, got "
                             f"{value!r}; set JudgeConfig.repetition_penalty to override it")
        return float(value)

    def _check_image_size(self) -> int:
        size = self.config.image_size
        grid = self.image_processor(images=[Image.new("RGB", (size, size))], return_tensors="pt")["image_grid_thw"]
        side = size // self.patch_size
        if grid.tolist() != [[1, side, side]]:
            raise ValueError(f"{self.name}: the image processor resizes {size}x{size} to grid {grid.tolist()[0]}, "
                             f"not [1, {side}, {side}]; pick an image_size within its pixel budget")
        return side * side // (self.merge * self.merge)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # -- the protocol
    @torch.inference_mode()
    def score(self, samples: Sequence[RewardSample]) -> RewardBreakdown:
        prepared = self.prepare(samples)
        values, unparsable = self.rate(prepared)
        values["R_RI"], unparsable["R_RI"] = self.ground(prepared)
        return RewardBreakdown(**{c: values[c] for c in COMPONENTS}, unparsable=unparsable)

    # -- the stages of `score`, public so tests and benchmarks can drive them one by one
    @torch.inference_mode()
    def prepare(self, samples: Sequence[RewardSample]) -> PreparedBatch:
        """Resize and encode every sample's image and layout canvas through the vision tower, once."""
        if not samples:
            raise ValueError("no samples to score")
        size = self.config.image_size
        pictures = []
        for i, s in enumerate(samples):
            image = s.pixels()
            if image.width * image.height == 0:
                raise ValueError(f"sample {i}: image has no pixels ({image.width}x{image.height})")
            image = image.convert("RGB")
            pictures += [image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC),
                         render_layout(s.chain.objects, size)]
        features, grids = [], []
        step = self.config.vision_batch_size
        for start in range(0, len(pictures), step):
            enc = self.image_processor(images=pictures[start:start + step], return_tensors="pt")
            grid = enc["image_grid_thw"]
            out = self.model.model.get_image_features(enc["pixel_values"].to(self.device, self.model.dtype),
                                                      grid.to(self.device))
            features.extend(out.pooler_output)
            grids.append(grid)
        self.counters["pictures"] += len(pictures)
        return PreparedBatch(samples, features, torch.cat(grids))

    @torch.inference_mode()
    def rate(self, prepared: PreparedBatch) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """R_PI, R_sem, R_spa in [0, 1] and their unparsable counts, in `config.mode`."""
        samples, n = prepared.samples, len(prepared.samples)
        expected = self.config.mode == "expected"
        requests = [self.request(self._rubric_text(r, s), None if r.image is None else 2 * i + (r.image == "layout"),
                                  answer_prefix=ANSWER_PREFIX if expected else "")
                    for r in RUBRICS for i, s in enumerate(samples)]
        values, unparsable = {}, {}
        if expected:
            for req in requests:
                req.ids.append(self.digit_ids[1])  # read P(next | "1") too: is it 1 or 10?
            logp = self.score_logprobs(requests, prepared)
            for k, rubric in enumerate(RUBRICS):
                part = logp[k * n:(k + 1) * n]
                raw = expected_score(part[:, 0], part[:, 1], rubric.lo)
                bad = torch.isnan(raw)
                values[rubric.component] = torch.where(bad, 0.0, scale_score(raw.nan_to_num(rubric.lo), rubric.lo,
                                                                             rubric.hi)).float()
                unparsable[rubric.component] = int(bad.sum())
        else:
            texts = self.generate(requests, prepared, self.config.max_new_tokens_score)
            for k, rubric in enumerate(RUBRICS):
                parsed = [parse_score(t, rubric.lo, rubric.hi) for t in texts[k * n:(k + 1) * n]]
                values[rubric.component] = torch.tensor(
                    [0.0 if p is None else float(scale_score(p, rubric.lo, rubric.hi)) for p in parsed])
                unparsable[rubric.component] = sum(p is None for p in parsed)
        return values, unparsable

    @torch.inference_mode()
    def ground(self, prepared: PreparedBatch) -> tuple[torch.Tensor, int]:
        """R_RI `[B]` (mean IoU of planned vs grounded boxes) and the number of unparsable grounding answers."""
        requests, owners = [], []
        for i, s in enumerate(prepared.samples):
            for obj in s.chain.objects:
                requests.append(self.request(GROUNDING.format(object=self._clean(obj.name)), 2 * i))
                owners.append(i)
        texts = self.generate(requests, prepared, self.config.max_new_tokens_box) if requests else []
        found: list[list] = [[] for _ in prepared.samples]
        unparsable = 0
        for i, text in zip(owners, texts):
            box = parse_box(text)
            unparsable += box is None
            width, height = judge_frame(prepared.grids[2 * i].tolist(), self.patch_size)
            found[i].append(None if box is None else judge_to_got(box, width, height))
        values = [mean_iou([o.box for o in s.chain.objects], f) for s, f in zip(prepared.samples, found)]
        return torch.tensor(values, dtype=torch.float32), unparsable

    # -- prompts
    def _clean(self, text: str) -> str:
        """User and policy text with the tokenizer's special-token strings removed: a chain that spells
        `<|image_pad|>` or `<|im_end|>` must stay text, not become control tokens. Repeated until nothing is
        left to remove: dropping one can join its neighbours into another (`<|image_<|im_end|>pad|>`)."""
        while (cleaned := self._specials_re.sub("", text)) != text:
            text = cleaned
        return text

    def _rubric_text(self, rubric: Rubric, sample: RewardSample) -> str:
        return rubric.template.format(prompt=self._clean(sample.prompt.strip()),
                                      reasoning=self._clean(sample.reasoning_text()[:MAX_REASONING_CHARS]))

    def request(self, user_text: str, image: int | None, answer_prefix: str = "") -> JudgeRequest:
        """Encode a user turn (showing picture `image` of the prepared batch, if any) and the opened answer."""
        text = chat(user_text, image=image is not None, answer_prefix=answer_prefix)
        if image is not None:
            text = text.replace(IMAGE_SLOT, IMAGE_SLOT.replace("<|image_pad|>", "<|image_pad|>" * self.image_tokens))
        return JudgeRequest(self.tokenizer(text, add_special_tokens=False)["input_ids"], image)

    # -- model
    def _inputs(self, rows: Sequence[JudgeRequest], prepared: PreparedBatch, length: int,
                batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded `[batch, length]` rows -> input embeddings (image features in place), 3-D rotary positions
        `[3, batch, length]` (transformers' `get_rope_index` on the real rows, 0 on padding) and validity."""
        ids, valid = left_pad([r.ids for r in rows], length, batch, self.pad_id)
        n = len(rows)
        images = [r.image for r in rows if r.image is not None]
        grids = prepared.grids[images] if images else None
        real = ids[:n]
        positions = torch.zeros(3, batch, length, dtype=torch.long)
        positions[:, :n], _ = self.model.model.get_rope_index(
            real, mm_token_type_ids=(real == self.image_token_id).int(), image_grid_thw=grids,
            attention_mask=valid[:n].long())
        ids = ids.to(self.device)
        embeds = self.text_model.embed_tokens(ids)
        if images:
            feats = torch.cat([prepared.features[i] for i in images]).to(embeds.dtype)
            embeds = embeds.masked_scatter((ids == self.image_token_id)[..., None], feats)
        return embeds, positions.to(self.device), valid.to(self.device)

    def _score_forward(self, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Fixed-shape scoring forward (the CUDA-graph body): log-probs `[B, 2, 10]` of the digit tokens at the
        last two positions, normalised over the whole vocabulary, in fp32."""
        mask = {"full_attention": causal_padding_mask(valid)}
        hidden = self.text_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                 use_cache=False).last_hidden_state
        logits = self.model.lm_head(hidden[:, -2:]).float()
        return logits.log_softmax(-1).index_select(-1, self._digits_dev)

    @torch.inference_mode()
    def score_logprobs(self, requests: Sequence[JudgeRequest], prepared: PreparedBatch) -> torch.Tensor:
        """`[N, 2, 10]` digit log-probs for every request, in bucketed batches (graphs on CUDA)."""
        out = torch.full((len(requests), 2, len(DIGITS)), torch.nan)
        cfg = self.config
        for idx, length, batch in plan_batches([len(r.ids) for r in requests], cfg.seq_buckets, cfg.max_batch_size):
            rows = [requests[i] for i in idx]
            inputs = self._inputs(rows, prepared, length, batch)
            run = self._scorer if length <= cfg.seq_buckets[-1] else self._score_forward
            out[idx] = run(*inputs)[:len(rows)].cpu()
            self.counters["score_rows"] += len(rows)
            self.counters["score_forwards"] += 1
        return out

    def _greedy(self, hidden: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The next tokens `[B]` from the last hidden states `[B, H]`. With `seen` `[B, V]` (the tokens each row's
        prompt and answer hold), transformers' RepetitionPenaltyLogitsProcessor first, on fp32 logits as its
        `generate` does: a seen token's logit is multiplied by the penalty if negative, else divided by it."""
        logits = self.model.lm_head(hidden)
        if seen is not None:
            logits, p = logits.float(), self.repetition_penalty
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        return logits.argmax(-1)

    def _seen_tokens(self, rows: Sequence[JudgeRequest], batch: int) -> torch.Tensor:
        """`[batch, V]`: True where the token occurs in the row's prompt (image placeholders included, padding
        not: transformers skips the left padding too)."""
        seen = torch.zeros(batch, self.model.lm_head.out_features, dtype=torch.bool, device=self.device)
        which = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r.ids) for r in rows]))
        seen[which.to(self.device), torch.tensor([t for r in rows for t in r.ids], device=self.device)] = True
        return seen

    def _decode_step(self, embeds: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                     position: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """One greedy step of a fixed-shape batch (the CUDA-graph body): the new tokens' embeddings `[B, 1, H]`,
        their rotary positions `[3, B, 1]`, the keys they may see `[B, 1, 1, T]` (T: the bucket's cache), the
        cache position their keys and values go to and, with a repetition penalty, the tokens seen so far `[B, V]`
        (an input, not state the step updates, so the step stays idempotent) -> the next tokens `[B]`."""
        cache = self._decode_caches.get(embeds.shape[0], keys.shape[-1])
        seek(cache, position)
        hidden = self.text_model(inputs_embeds=embeds, position_ids=positions, attention_mask={"full_attention": keys},
                                 cache=cache, use_cache=True).last_hidden_state
        return self._greedy(hidden[:, -1], seen)

    @torch.inference_mode()
    def generate(self, requests: Sequence[JudgeRequest], prepared: PreparedBatch, max_new_tokens: int) -> list[str]:
        """Greedy answers (special tokens dropped) in the scoring's fixed-shape batches, decode steps graphed on
        CUDA, with `repetition_penalty` (no extra work at 1.0); a row stops at <|im_end|>/<|endoftext|> (the
        batch when all of its rows have)."""
        out = [""] * len(requests)
        cfg = self.config
        for idx, length, batch in plan_batches([len(r.ids) for r in requests], cfg.seq_buckets, cfg.max_batch_size):
            n, rows = len(idx), [requests[i] for i in idx]
            embeds, positions, valid = self._inputs(rows, prepared, length, batch)
            seen = self._seen_tokens(rows, batch) if self.repetition_penalty != 1.0 else None
            total = length + max_new_tokens
            cache = self._decode_caches.get(batch, total)
            keys = torch.zeros(batch, total, dtype=torch.bool, device=self.device)  # the cache positions written
            keys[:, :length] = valid
            prompt_mask = torch.cat([causal_padding_mask(valid), keys.new_zeros(batch, 1, length, max_new_tokens)], -1)
            seek(cache, 0)
            hidden = self.text_model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True,
                                     attention_mask={"full_attention": prompt_mask}).last_hidden_state
            token = self._greedy(hidden[:, -1], seen)
            step_fn = self._decoder if length <= cfg.seq_buckets[-1] else self._decode_step
            next_pos = positions.amax(dim=(0, 2)) + 1  # Qwen: text after the prompt continues from its max position
            where = torch.arange(length, total, device=self.device)
            new, done = [], torch.zeros(batch, dtype=torch.bool, device=self.device)
            for step in range(max_new_tokens):
                token = torch.where(done, self.stop_ids[0], token)
                new.append(token)
                done |= torch.isin(token, self._stop_dev)
                if step == max_new_tokens - 1 or bool(done[:n].all()):
                    break
                keys[:, length + step] = True
                pos = (next_pos + step).view(1, -1, 1).expand(3, -1, 1)
                # the penalty counts the token being fed in: mark it, then hand the mask to the step as an input
                seen_now = () if seen is None else (seen.scatter_(1, token[:, None], True),)
                token = step_fn(self.text_model.embed_tokens(token[:, None]), pos, keys[:, None, None], where[step],
                                *seen_now)
            self.counters["decode_rows"] += n
            self.counters["decode_steps"] += len(new)
            for i, row in zip(idx, torch.stack(new, 1)[:n].tolist()):
                cut = next((k for k, t in enumerate(row) if t in self.stop_ids), len(row))
                out[i] = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
        return out


# ---------------------------------------------------------------------------------------------- construction
def build_qwen_judge_preset(name: str, *, seed: int = 0, config: JudgeConfig | None = None,
                            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> QwenVLJudge:
    """A seeded random judge: `tiny-qwen` (tests, judge image 56 px) or `qwen2.5-vl-7b-shape` (real dimensions,
    random weights, for benchmarks). Both use the tiny tokenizer."""
    if name not in JUDGE_PRESETS:
        raise ValueError(f"unknown judge preset {name!r}; choose one of {', '.join(JUDGE_PRESETS)}")
    tokenizer = _cached_tiny_tokenizer()
    tiny = name == "tiny-qwen"
    model_config = tiny_qwen_config(tokenizer) if tiny else qwen7b_shape_config(tokenizer)
    model_config._attn_implementation = "sdpa"
    model = seeded_random_model(Qwen2_5_VLForConditionalGeneration, model_config, seed=seed, dtype=dtype,
                                device=device)
    processor = ImageOnlyQwenProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    config = config or (JudgeConfig(image_size=56) if tiny else JudgeConfig())
    return QwenVLJudge(model, processor, config, name=name)


def build_tiny_qwen_judge(seed: int = 0, config: JudgeConfig | None = None) -> QwenVLJudge:
    """The tiny random judge on CPU in fp32 (a few hundred kB): what the tests run."""
    return build_qwen_judge_preset("tiny-qwen", seed=seed, config=config)


def check_judge_dir(path: str | Path) -> Path:
    """Fail at start-up, saying what is missing, on a directory that cannot hold a Qwen2.5-VL judge."""
    path = check_model_dir(path, "qwen2_5_vl", "a Qwen2.5-VL checkpoint, e.g. Qwen2.5-VL-7B-Instruct,", "judge")
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise FileNotFoundError(f"{path} has no image processor config (preprocessor_config.json)")
    return path


def load_qwen_judge(model_dir: str | Path, config: JudgeConfig | None = None, *,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> QwenVLJudge:
    """A Qwen2.5-VL judge (e.g. Qwen2.5-VL-7B-Instruct) from a local Hugging Face directory."""
    path = check_judge_dir(model_dir)
    processor = ImageOnlyQwenProcessor.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                               device_map=str(torch.device(device)))
    return QwenVLJudge(model, processor, config, name=str(path))


def save_judge(judge: QwenVLJudge, path: str | Path) -> None:
    """Write model + processor so `load_qwen_judge(path)` restores the same judge."""
    judge.model.save_pretrained(path)
    judge.processor.save_pretrained(path)


def make_qwen_judge(spec: str, config: JudgeConfig | None = None, *, seed: int = 0,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> QwenVLJudge:
    """A preset name from `JUDGE_PRESETS` or a local Qwen2.5-VL model directory."""
    if spec in JUDGE_PRESETS:
        return build_qwen_judge_preset(spec, seed=seed, config=config, device=device, dtype=dtype)
    return load_qwen_judge(spec, config, device=device, dtype=dtype)
