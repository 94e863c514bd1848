"""The shapes world's untrained model: a tiny Janus carrying the trained VQ, its tokenizer, and the SFT data.

The tokenizer is a byte-level BPE (any text still encodes) trained on the world's own prompts and chains, so the
17 grid coordinates, the colour/shape words and the GoT chat template become single tokens: a chain of three
objects is ~45 tokens instead of ~90, which halves SFT and GRPO time on CPU and spares a small LM from learning
multi-token numbers.
"""
from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import JanusForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.janus.modeling_janus import JanusVQVAE

from gotr1.chain import GOT_TAGS, chat_prompt
from gotr1.model import JanusBundle, janus_processor, make_bundle, tiny_config, train_bpe_tokenizer
from gotr1.sft import SFTExample
from gotr1.shapes.render import IMAGE_SIZE, render_scene
from gotr1.shapes.vq import DEFAULT_VQ_PATH, PATCH_SIZE, encode_images, load_vq_state
from gotr1.shapes.world import CATEGORIES, GRID, Scene, grid_to_frame, gt_chain, sample_scene

TOKENIZER_VOCAB = 512
TOKENIZER_SEED = "shapes-tokenizer"


@lru_cache(maxsize=1)
def shapes_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on 500 sampled prompts and ground-truth chains (deterministic)."""
    rng = random.Random(TOKENIZER_SEED)
    scenes = [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(500)]
    text = [chat_prompt(s.prompt) for s in scenes] + [gt_chain(s) for s in scenes]
    text += [",".join(str(grid_to_frame(g)) for g in range(GRID + 1))] * 50
    # The GoT tags become atomic added tokens, which cut the text into separately pre-tokenised pieces
    # (an object name starts a piece, without a leading space): train on exactly those pieces.
    split = re.compile("|".join(re.escape(t) for t in GOT_TAGS))
    corpus = [piece for line in text for piece in split.split(line) if piece]
    return train_bpe_tokenizer(corpus, vocab_size)


def build_shapes_base(vq: str | Path | JanusVQVAE | None = None, seed: int = 0, *, hidden_size: int = 128,
                      num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                      max_positions: int = 1024) -> JanusBundle:
    """A tiny Janus at the shapes geometry (64 px, 8x8 image tokens) whose `model.model.vqmodel` is the trained VQ.

    `vq` is a safetensors file written by `gotr1.shapes.vq` (default: the shipped one) or a `JanusVQVAE`. The LM
    is random (seeded); `generation_embeddings` start as the VQ codebook, so image-token inputs begin with the
    codes' geometry instead of noise. SFT trains the rest.
    """
    if isinstance(vq, JanusVQVAE):
        state, vq_cfg = vq.state_dict(), vq.config
    else:
        state, vq_cfg, _ = load_vq_state(vq if vq is not None else DEFAULT_VQ_PATH)
    tokenizer = shapes_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64
    config = tiny_config(vocab, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=hidden_size,
                         num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         codebook_size=vq_cfg.num_embeddings, max_positions=max_positions)
    config.vq_config = copy.deepcopy(vq_cfg)  # the trained VQ's own architecture, facing this LM's width
    config.vq_config.projection_dim = config.vq_config.image_token_embed_dim = hidden_size
    config.vq_config.num_patches = IMAGE_SIZE // PATCH_SIZE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    missing, unexpected = model.model.vqmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"VQ weights do not fit the shapes geometry: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    with torch.no_grad():
        model.model.generation_embeddings.weight.copy_(
            F.normalize(model.model.vqmodel.quantize.embedding.weight, dim=-1))
    processor = janus_processor(tokenizer, config.vision_config.image_size, config.vision_config.num_image_tokens)
    return make_bundle(model, tokenizer, processor, "shapes")


@torch.no_grad()
def sft_examples(scenes: Sequence[Scene], bundle: JanusBundle, batch_size: int = 64) -> list[SFTExample]:
    """(prompt, chain, codes) for each scene: its ground-truth render encoded by the bundle's own VQ."""
    vq = bundle.model.model.vqmodel.eval()
    images = [render_scene(s, bundle.image_size) for s in scenes]
    codes = encode_images(vq, images, batch_size, progress=True)
    if codes.shape[1] != bundle.num_image_tokens:
        raise ValueError(f"the VQ gives {codes.shape[1]} codes per image, the model expects {bundle.num_image_tokens}")
    return [SFTExample(s.prompt, gt_chain(s), c) for s, c in zip(scenes, codes)]
