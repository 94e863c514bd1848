"""One entry point to a ready Janus model: a local Hugging Face directory or a built-in preset.

Weights never come from the network: real Janus-Pro checkpoints load from a local directory in Hugging Face
format; `tiny` is a seeded random model (with a tokenizer trained offline) for tests, `shapes` the shapes world's
trained checkpoint (shipped in the package), and the `*-shape` presets have random weights with the real
dimensions, for benchmarks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import (
    AutoProcessor,
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from gotr1.chain import GOT_TAGS, chat_prompt

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TOKEN, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
PRESETS = ("tiny", "shapes", "janus-pro-1b-shape", "janus-pro-7b-shape")


@dataclass
class JanusBundle:
    """A Janus model with its tokenizer and the ids every component needs (state only, no behaviour hidden)."""

    model: JanusForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    processor: JanusProcessor
    name: str
    bos_id: int
    eos_id: int
    pad_id: int
    boi_id: int
    eoi_id: int
    image_token_id: int
    got_tag_ids: tuple[int, int, int, int]

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.vision_config.num_image_tokens

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def max_positions(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def encode_prompts(self, prompts: list[str], max_reasoning_tokens: int) -> list[list[int]]:
        """Token ids of each prompt in the GoT chat format (BOS first); rejects prompts that cannot fit or that
        spell a special token.

        The longest possible sequence is prompt + reasoning + `<begin_of_image>` + image tokens, and it must
        fit the model's positions: refusing up front beats failing 600 tokens into a rollout.
        """
        if not prompts:
            raise ValueError("no prompts given")
        out = []
        # The tokenizer reads special-token and GoT-tag text as the token itself: a caption must not inject BOS
        # or <begin_of_image>, nor a box the chain parser and judge would take for the policy's own plan.
        reserved = [(t, "special token") for t in self.tokenizer.all_special_tokens]
        reserved += [(t, "GoT tag") for t in GOT_TAGS]
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} is empty")
            if hit := next(((t, kind) for t, kind in reserved if t in prompt), None):
                raise ValueError(f"prompt {i} contains the {hit[1]} {hit[0]!r}")
            ids = self.tokenizer(chat_prompt(prompt), add_special_tokens=True)["input_ids"]
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id, *ids]
            total = len(ids) + max_reasoning_tokens + 1 + self.num_image_tokens
            if total > self.max_positions:
                raise ValueError(
                    f"prompt {i} is too long: {len(ids)} prompt tokens + {max_reasoning_tokens} reasoning + 1 + "
                    f"{self.num_image_tokens} image tokens = {total} > the model's {self.max_positions} positions")
            out.append(ids)
        return out

    def decode_text(self, ids: list[int]) -> str:
        """Reasoning text with the GoT tags kept (they are ordinary added tokens) and specials dropped."""
        return self.tokenizer.decode([i for i in ids if i != self.boi_id], skip_special_tokens=True)

    @torch.no_grad()
    def decode_images(self, image_tokens: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """VQ-decode `[B, num_image_tokens]` codebook ids to RGB PIL images, in batches."""
        images = []
        for chunk in image_tokens.split(batch_size):  # decode_image_tokens returns channels-last
            images.extend(to_images(self.model.decode_image_tokens(chunk.to(self.device)).permute(0, 3, 1, 2)))
        return images


# ------------------------------------------------------------------------------------------ pixels <-> codes
def pixel_values(images: list[Image.Image], size: int) -> torch.Tensor:
    """RGB images of any size -> `[B, 3, size, size]` in [-1, 1] (Janus's mean = std = 0.5 normalisation)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC) if im.size != (size, size)
                         else im.convert("RGB"), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """`[B, 3, H, W]` in about [-1, 1] -> RGB images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


@torch.no_grad()
def encode_images(vq: torch.nn.Module, images: list[Image.Image], batch_size: int = 64,
                  progress: bool = False) -> torch.Tensor:
    """Images -> `[B, grid*grid]` codebook ids through transformers' `JanusVQVAE.encode`, at the VQ's own size;
    `progress` shows a bar (the shapes SFT set's 10,000 scenes take tens of seconds on 2 cores)."""
    size = vq.config.num_patches * 2 ** (len(vq.config.channel_multiplier) - 1)
    param = next(vq.parameters())
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="VQ-encoding images", unit="batch", disable=not progress):
        pixels = pixel_values(images[i:i + batch_size], size).to(param.device, param.dtype)
        tokens = vq.encode(pixels).image_tokens  # flat [b * grid * grid] in transformers 5.x
        out.append(tokens.view(pixels.shape[0], -1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- tokenizer
_CORPUS_WORDS = (
    "a an the of and with on in to is are at its left right above below top bottom next near behind front "
    "red green blue yellow purple orange black white gray pink brown cyan magenta "
    "circle square triangle star cat dog bird car tree house person table chair cup bowl apple banana "
    "one two three four five six seven eight nine ten small large big tiny round wooden metal glass "
    "image picture photo scene background foreground sky grass water wall floor bright dark light "
    "Follow the caption to generate an image through a chain of thought process"
).split()


def train_bpe_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on `corpus` with Janus's special tokens and the GoT tags: deterministic,
    no download, any text encodes. The tags are ordinary added tokens (as GoT-R1 adds them), kept in decoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    specials = [BOS, EOS, PAD, IMAGE_TOKEN, BOI, EOI]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    core.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                             special_tokens=[(BOS, core.token_to_id(BOS))])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI})
    tok.padding_side = "left"
    tok.add_tokens(list(GOT_TAGS))
    return tok


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The tiny preset's tokenizer, trained on a fixed corpus of captions and box coordinates."""
    corpus = [chat_prompt(" ".join(_CORPUS_WORDS[i:i + 9])) for i in range(0, len(_CORPUS_WORDS), 3)]
    corpus += [f"({x},{y}),({x + 137},{y + 211})" for x in range(0, 800, 53) for y in range(0, 700, 71)]
    return train_bpe_tokenizer(corpus, vocab_size)


# ------------------------------------------------------------------------------------------------- presets
def tiny_config(vocab_size: int, *, image_size: int = 384, patch_size: int = 16, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, codebook_size: int = 1024,
                max_positions: int = 2048) -> JanusConfig:
    """The smallest Janus that keeps the real geometry (384 px, patch 16 -> 576 image tokens by default).

    Grouped-query attention (4 heads, 2 KV heads) on purpose: the engine must handle both MHA and GQA.
    The VQ decoder upsamples by 2**(levels-1) == patch_size, so `grid x grid` codes decode to `image_size`.
    """
    grid = image_size // patch_size
    levels = patch_size.bit_length()  # 16 -> 5 levels -> x16 upsampling
    if 2 ** (levels - 1) != patch_size:
        raise ValueError(f"patch_size must be a power of two, got {patch_size}")
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=max_positions),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=image_size,
                           patch_size=patch_size, mlp_ratio=2, projection_dim=hidden_size,
                           num_image_tokens=grid * grid),
        vq_config=dict(embed_dim=8, num_embeddings=codebook_size, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 2, 2, 4][:levels], num_res_blocks=1,
                       projection_dim=hidden_size, image_token_embed_dim=hidden_size),
    )


def real_shape_config(vocab_size: int, size: str) -> JanusConfig:
    """Janus-Pro-1B / 7B dimensions (tech report and HF configs); vision and VQ keep transformers' defaults."""
    hidden, layers, heads, ffn = {"1b": (2048, 24, 16, 5632), "7b": (4096, 30, 32, 11008)}[size]
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=16384),
        vision_config=dict(projection_dim=hidden, num_image_tokens=576),
        vq_config=dict(projection_dim=hidden, image_token_embed_dim=hidden),
    )


def make_bundle(model: JanusForConditionalGeneration, tokenizer, processor, name: str) -> JanusBundle:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (tokenizer.bos_token, tokenizer.eos_token,
                                                          tokenizer.pad_token)}
    boi, eoi, image = (tokenizer.convert_tokens_to_ids(getattr(tokenizer, a)) for a in
                       ("boi_token", "eoi_token", "image_token"))
    tags = tuple(tokenizer.convert_tokens_to_ids(t) for t in GOT_TAGS)
    vocab = model.config.text_config.vocab_size
    if max(*ids.values(), boi, eoi, image, *tags) >= vocab:
        raise ValueError(f"{name}: tokenizer ids exceed the model's vocabulary of {vocab}")
    bos, eos, pad = (ids[t] for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token))
    model.config.image_token_id = image
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, generation_kwargs={"boi_token_id": boi},
        guidance_scale=5.0)
    return JanusBundle(model=model.eval(), tokenizer=tokenizer, processor=processor, name=name, bos_id=bos,
                       eos_id=eos, pad_id=pad, boi_id=boi, eoi_id=eoi, image_token_id=image,
                       got_tag_ids=tags)  # type: ignore[arg-type]


def janus_processor(tokenizer, image_size: int, num_image_tokens: int) -> JanusProcessor:
    # Janus-Pro normalises with mean = std = 0.5 (the class default is CLIP's).
    ip = JanusImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3)
    return JanusProcessor(image_processor=ip, tokenizer=tokenizer, num_image_tokens=num_image_tokens)


def seeded_random_model(cls, config, *, seed: int, dtype: torch.dtype, device: str | torch.device):
    """`cls(config)` with random weights drawn from `seed`, created directly in `dtype` on `device` (a 7B-shaped
    model never exists in fp32 on the CPU), leaving the caller's RNG and default dtype untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return cls(config)
        finally:
            torch.set_default_dtype(default)


@lru_cache(maxsize=1)
def _cached_tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def build_preset(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 **tiny_overrides) -> JanusBundle:
    """`tiny` (random, seeded, a few MB), `shapes` (the shapes world's shipped SFT checkpoint) or
    `janus-pro-{1b,7b}-shape` (random weights with the real dimensions, built lazily)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if name == "shapes":
        from gotr1.shapes.preset import load_shapes

        return load_shapes(dtype=dtype, device=device)
    tokenizer = _cached_tiny_tokenizer()
    if name == "tiny":
        vocab = -(-len(tokenizer) // 64) * 64
        config = tiny_config(vocab, **tiny_overrides)
    else:
        config = real_shape_config(102400, name.split("-")[2])
    model = seeded_random_model(JanusForConditionalGeneration, config, seed=seed, dtype=dtype, device=device)
    if name == "tiny":
        _sharpen_image_head(model)
    processor = janus_processor(tokenizer, config.vision_config.image_size, config.vision_config.num_image_tokens)
    return make_bundle(model, tokenizer, processor, name)


TINY_HEAD_SCALE = 30.0


@torch.no_grad()
def _sharpen_image_head(model: JanusForConditionalGeneration) -> None:
    """Give the tiny model's image head a trained model's dynamic range.

    With transformers' 0.02 init a 64-wide model's image logits span about 0.01: the distribution is uniform,
    and behind the final RMSNorm no adapter can move it, so nothing could learn. Scaled by `TINY_HEAD_SCALE`
    they span a few nats, like a real checkpoint's. (The text head is tied to the input embeddings: scaling it
    would make every token predict itself, so text stays near-uniform until trained.)
    """
    model.model.generation_head.vision_head.weight.mul_(TINY_HEAD_SCALE)


def check_model_dir(path: str | Path, model_type: str = "janus", what: str = "a Janus-Pro checkpoint",
                    role: str = "model") -> Path:
    """Fail early, with a message that says what is missing, on a directory that cannot hold the model.

    Shared by the policy (`janus`) and the judge (`qwen2_5_vl`) loaders: existence, `config.json` of the right
    `model_type`, every weight shard an index names, tokenizer files.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{role} directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{role} path {path} is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        found = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from e
    if found != model_type:
        raise ValueError(f"{path} holds a {found!r} model, expected {model_type!r} ({what} in Hugging Face format)")
    index = next((p for p in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json")
                  if p.is_file()), None)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index} is not valid JSON: {e}") from e
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is incomplete: missing weight shards {', '.join(missing)}")
    elif not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise FileNotFoundError(f"{path} has no weights (model.safetensors or an index of shards)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return path


def load_model_dir(path: str | Path, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> JanusBundle:
    """Janus-Pro (or a saved preset) from a local Hugging Face directory; the GoT tags are added if absent."""
    path = check_model_dir(path)
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer_config.json (it declares Janus's image tokens)")
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    try:
        model = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
    except SafetensorError as e:
        raise ValueError(f"{path}: a weight file is corrupt or truncated ({e})") from e
    if tokenizer.add_tokens([t for t in GOT_TAGS if t not in tokenizer.get_vocab()]):
        if len(tokenizer) > model.config.text_config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
    return make_bundle(model, tokenizer, processor, str(path))


def load_model(preset: str | None = None, model_dir: str | Path | None = None, *, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> JanusBundle:
    """Exactly one of `preset` / `model_dir`: what every CLI command and benchmark calls."""
    if (preset is None) == (model_dir is None):
        raise ValueError("give exactly one of a preset name or a model directory")
    if preset is not None:
        return build_preset(preset, seed=seed, dtype=dtype, device=device)
    return load_model_dir(model_dir, dtype=dtype, device=device)


def save_bundle(bundle: JanusBundle, path: str | Path) -> None:
    """Write model + processor so `load_model(model_dir=path)` restores the same model."""
    bundle.model.save_pretrained(path)
    bundle.processor.save_pretrained(path)


def load_adapter(bundle: JanusBundle, path: str | Path) -> None:
    """Apply a peft LoRA adapter directory (a GRPO `checkpoint-N/`) to the bundle's model, merged into the base
    weights: serving and evaluation never update them, so no step should pay LoRA's extra matmuls."""
    from peft import PeftModel

    path = Path(path).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a peft adapter directory (no adapter_config.json)")
    bundle.model = PeftModel.from_pretrained(bundle.model, str(path)).merge_and_unload().eval()
