"""A tiny `JanusVQVAE` (transformers' own class) trained on rendered shapes scenes.

Two facts of transformers' implementation shape the recipe:

* `encode` picks codes by plain Euclidean distance, but `decode` looks them up through `get_codebook_entry`, which
  L2-normalises them (Janus's VQ-16 has an L2-normalised codebook). They agree only if every codebook row has unit
  norm: then `argmin |z - e|` = `argmax z.e` = the cosine-nearest code. We train with normalised latents and codes
  (the loss and straight-through estimator of `JanusVQVAEVectorQuantizer`, on unit vectors) and store the
  normalised codebook, so the weights round-trip through transformers' `encode`/`decode` unchanged.
* The decoder ends in `GroupNorm(32 groups) -> SiLU -> conv`. At 32 channels that is a per-channel instance norm,
  which erases every channel's absolute level: a flat colour must then be produced by thresholding standardised
  features, which plain reconstruction training finds only very slowly (objects stay brown for hundreds of steps).
  A throw-away 1x1 head on the input of that norm, trained to classify each pixel's palette colour (deep
  supervision), puts colour-indicator features there and colours appear within a few hundred steps. The same head
  also classifies each pixel's shape, and the loss weighs the background around objects too: that is where a
  circle differs from a square.

Training first runs a plain autoencoder through the continuous unit latents, then seeds the codebook by spherical
k-means over the last warm-up latents and switches quantisation on (codes left unused are re-seeded with the
latents they serve worst). Every batch is freshly sampled: nothing to overfit.

Rebuild the shipped tokenizer (the time is printed and stored in the file's metadata):

    python -m gotr1.shapes.vq --out gotr1/shapes/assets/vq.safetensors --steps 2000 --seed 0 --threads 2
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from gotr1.model import encode_images, pixel_values, to_images
from gotr1.shapes.render import IMAGE_SIZE, render_scene, shape_mask
from gotr1.shapes.world import CATEGORIES, COLOURS, SHAPES, sample_scene

PATCH_SIZE = 8  # 64 px / 8 = an 8x8 grid of image tokens; the decoder upsamples 2**(4 levels - 1) = 8x
CODEBOOK_SIZE = 256
DEFAULT_VQ_PATH = Path(__file__).parent / "assets" / "vq.safetensors"


def vq_config(codebook_size: int = CODEBOOK_SIZE, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
              hidden_size: int = 64) -> JanusVQVAEConfig:
    """The smallest VQ at the shapes geometry: 32 channels at every level (GroupNorm's minimum), no residual blocks
    in the encoder and one per level in the decoder: 240k parameters against `tiny_config`'s 1.1M, cheap to train
    and to run on every GRPO image on CPU. `hidden_size` only sizes the config's LM-facing fields (the VQ weights
    do not depend on it)."""
    levels = patch_size.bit_length()
    if 2 ** (levels - 1) != patch_size or image_size % patch_size:
        raise ValueError(f"patch_size must be a power of two dividing image_size, got {patch_size} / {image_size}")
    return JanusVQVAEConfig(embed_dim=8, num_embeddings=codebook_size, latent_channels=32, base_channels=32,
                            channel_multiplier=[1] * levels, num_res_blocks=0, num_patches=image_size // patch_size,
                            projection_dim=hidden_size, image_token_embed_dim=hidden_size)


@torch.no_grad()
def decode_codes(vq: JanusVQVAE, codes: torch.Tensor) -> list[Image.Image]:
    """`[B, grid*grid]` codebook ids -> RGB images through transformers' `JanusVQVAE.decode`."""
    return to_images(vq.decode(codes.to(next(vq.parameters()).device)))


# -------------------------------------------------------------------------------------------------- train
@dataclass
class VQTrainConfig:
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 3e-3  # one-cycle peak
    # Commitment weight: the VQ-VAE paper's beta on ||z - sg(zq)||^2 (transformers' quantizer puts 0.25 on the
    # codebook term instead)
    beta: float = 0.25
    codebook_size: int = CODEBOOK_SIZE
    warmup_fraction: float = 0.5  # first steps train a plain autoencoder on the unit latents
    foreground_weight: float = 4.0  # pixels on or within 2 px of an object count this much more in the loss
    colour_weight: float = 1.0  # weight of the deep-supervision colour and shape classification losses
    restart_every: int = 50  # re-seed codes unused for this many steps from the worst-served current latents
    init_batches: int = 40  # warm-up batches whose latents seed the codebook (spherical k-means)
    seed: int = 0


def _quantise(vq: JanusVQVAE, z: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-code quantisation of unit latents `z` [B, h, w, D] against the normalised codebook:
    (straight-through codes [B, D, h, w], VQ loss, ids [B*h*w])."""
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    ids = torch.argmax(z.reshape(-1, z.shape[-1]) @ codebook.t(), dim=1)
    zq = codebook[ids].view(z.shape)
    loss = torch.mean((zq - z.detach()) ** 2) + beta * torch.mean((zq.detach() - z) ** 2)
    zq = z + (zq - z).detach()
    return zq.permute(0, 3, 1, 2), loss, ids


def spherical_kmeans(points: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """`k` unit centroids of unit `points` [N, D]: k-means++ seeding on cosine distance, then Lloyd iterations.

    Most latents are background patches; seeding the codebook with random latents wastes most codes on them and
    leaves objects of different colours sharing codes. k-means++ spreads the codes over what the encoder emits.
    """
    g = torch.Generator().manual_seed(seed)
    centroids = points[torch.randint(len(points), (1,), generator=g)]
    dist = (1 - points @ centroids.t()).squeeze(1).clamp_min(0)
    for _ in range(1, k):
        pick = torch.multinomial(dist + 1e-12, 1, generator=g) if dist.sum() > 0 else torch.randint(
            len(points), (1,), generator=g)
        centroids = torch.cat([centroids, points[pick]])
        dist = torch.minimum(dist, (1 - points @ points[pick].t()).squeeze(1).clamp_min(0))
    for _ in range(iters):
        assign = (points @ centroids.t()).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, F.normalize(sums, dim=-1))
    return centroids


def _farthest(pool: torch.Tensor, codebook: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` rows of `pool` worst served by `codebook` (lowest best cosine): where dead codes are needed."""
    best = (pool @ F.normalize(codebook, dim=-1).t()).max(1).values
    return pool[best.argsort()[:k]] if len(pool) >= k else pool[torch.randint(len(pool), (k,))]


_COLOUR_INDEX = {c: i + 1 for i, c in enumerate(COLOURS)}
_SHAPE_INDEX = {s: i + 1 for i, s in enumerate(SHAPES)}


def _batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh scenes: pixels `[n, 3, 64, 64]`, each pixel's colour index and shape index (0 = background)."""
    scenes = [sample_scene(rng, CATEGORIES[rng.randrange(len(CATEGORIES))]) for _ in range(n)]
    pixels = pixel_values([render_scene(s) for s in scenes], IMAGE_SIZE)
    colours = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    shapes = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            mask = torch.from_numpy(shape_mask(o.shape, o.box, IMAGE_SIZE, IMAGE_SIZE))
            colours[i][mask] = _COLOUR_INDEX[o.colour]
            shapes[i][mask] = _SHAPE_INDEX[o.shape]
    return pixels, colours, shapes


def train_vq(config: VQTrainConfig, log=print) -> tuple[JanusVQVAE, dict]:
    """Fit a `JanusVQVAE` to freshly sampled scenes; returns it (eval mode, unit codebook) and training facts."""
    torch.manual_seed(config.seed)
    rng = random.Random(f"shapes-vq-{config.seed}")
    vq = JanusVQVAE(vq_config(config.codebook_size)).train()
    n_colour, n_shape = len(COLOURS) + 1, len(SHAPES) + 1
    head = torch.nn.Conv2d(vq.decoder.norm_out.num_channels, n_colour + n_shape, 1)
    features: dict[str, torch.Tensor] = {}
    hook = vq.decoder.norm_out.register_forward_pre_hook(lambda _m, args: features.__setitem__("h", args[0]))
    opt = torch.optim.Adam([*vq.parameters(), *head.parameters()], lr=config.learning_rate)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.learning_rate, total_steps=config.steps,
                                                pct_start=0.05)
    last_used = torch.zeros(config.codebook_size, dtype=torch.long)
    warmup = int(config.warmup_fraction * config.steps)
    seen: list[torch.Tensor] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, config.steps + 1):
        pixels, colours, shapes = _batch(rng, config.batch_size)
        z = F.normalize(vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1), dim=-1)  # [B, h, w, D]
        pool = z.detach().reshape(-1, z.shape[-1])
        if step > warmup - config.init_batches and step <= warmup:
            seen.append(pool)
        if step == warmup + 1:
            with torch.no_grad():
                points = torch.cat([*seen, pool])
                vq.quantize.embedding.weight.copy_(spherical_kmeans(points, config.codebook_size, seed=config.seed))
            seen.clear()
        if step > warmup:
            zq, vq_loss, ids = _quantise(vq, z, config.beta)
            last_used[ids.unique()] = step
        else:
            zq, vq_loss = z.permute(0, 3, 1, 2), torch.zeros(())
            last_used[:] = step
        recon = vq.decoder(vq.post_quant_conv(zq))
        near_object = F.max_pool2d((colours > 0)[:, None].float(), kernel_size=5, stride=1, padding=2)
        weight = 1.0 + (config.foreground_weight - 1.0) * near_object
        l1 = ((recon - pixels).abs() * weight).mean() / weight.mean()
        l2 = ((recon - pixels) ** 2 * weight).mean() / weight.mean()
        logits = head(features["h"])
        classes = F.cross_entropy(logits[:, :n_colour], colours) + F.cross_entropy(logits[:, n_colour:], shapes)
        loss = l1 + l2 + config.colour_weight * classes + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step > warmup and step % config.restart_every == 0 and step < 0.9 * config.steps:
            dead = (step - last_used >= config.restart_every).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = _farthest(pool, vq.quantize.embedding.weight, len(dead))
                last_used[dead] = step
        if step % 100 == 0 or step == config.steps:
            log(f"step {step}/{config.steps}  l1 {l1.item():.4f}  classes {classes.item():.4f}  vq {vq_loss.item():.4f}"
                f"  codes used {int((step - last_used < config.restart_every).sum())}  "
                f"{time.perf_counter() - start:.0f} s")
    hook.remove()
    with torch.no_grad():  # unit rows: transformers' Euclidean argmin == our cosine argmax
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))
    return vq.eval(), {"train_seconds": round(time.perf_counter() - start, 1),
                       "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
                       "torch_threads": torch.get_num_threads(), **asdict(config)}


# ---------------------------------------------------------------------------------------------- storage
def save_vq(vq: JanusVQVAE, path: str | Path, info: dict | None = None) -> None:
    """safetensors with the VQ config (and training facts) in the metadata, so `load_vq` needs nothing else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(vq.config.to_dict()), "info": json.dumps(info or {})}
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(path), metadata=meta)


def load_vq_state(path: str | Path = DEFAULT_VQ_PATH) -> tuple[dict[str, torch.Tensor], JanusVQVAEConfig, dict]:
    """(state dict, config, training info) of a saved VQ."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no VQ weights at {path}; rebuild with `python -m gotr1.shapes.vq --out {path}`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no VQ config in its metadata: not written by gotr1.shapes.vq.save_vq")
    config = JanusVQVAEConfig(**{k: v for k, v in json.loads(meta["config"]).items()
                                 if k in JanusVQVAEConfig.__dataclass_fields__})
    return load_file(str(path)), config, json.loads(meta.get("info", "{}"))


def load_vq(path: str | Path = DEFAULT_VQ_PATH) -> JanusVQVAE:
    state, config, _ = load_vq_state(path)
    vq = JanusVQVAE(config)
    vq.load_state_dict(state)
    return vq.eval()


# ------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate_vq(vq: JanusVQVAE, n_scenes: int = 200, seed: int = 1234) -> dict:
    """Reconstruction quality on fresh scenes: mean |pixel error| (0..255) and the exact judge on
    reconstructions of ground-truth renders (what GRPO will score: decoded images)."""
    from gotr1.chain import parse_chain
    from gotr1.rewards.protocol import RewardSample
    from gotr1.shapes.judge import ShapesJudge
    from gotr1.shapes.world import gt_chain

    rng = random.Random(f"shapes-vq-eval-{seed}")
    scenes = [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(n_scenes)]
    originals = [render_scene(s) for s in scenes]
    recons = decode_codes(vq, encode_images(vq, originals))
    err = np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                   for a, b in zip(originals, recons)])
    judge = ShapesJudge()
    out: dict = {"n_scenes": n_scenes, "mean_abs_pixel_error": round(float(err), 3)}
    for label, images in (("original", originals), ("reconstruction", recons)):
        samples = [RewardSample(s.prompt, parse_chain(c := gt_chain(s)), im, c) for s, im in zip(scenes, images)]
        scores = judge.score(samples)
        out[label] = {name: round(float(getattr(scores, name).mean()), 4) for name in ("R_PI", "R_RI")}
        out[label]["exact_match"] = round(float(np.mean([judge.exact_match(x) for x in samples])), 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gotr1.shapes.vq", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_VQ_PATH))
    p.add_argument("--steps", type=int, default=VQTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=VQTrainConfig.batch_size)
    p.add_argument("--learning-rate", type=float, default=VQTrainConfig.learning_rate)
    p.add_argument("--codebook-size", type=int, default=CODEBOOK_SIZE)
    p.add_argument("--warmup-fraction", type=float, default=VQTrainConfig.warmup_fraction)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--eval-scenes", type=int, default=400)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = VQTrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                           codebook_size=args.codebook_size, warmup_fraction=args.warmup_fraction, seed=args.seed)
    vq, info = train_vq(config)
    info["eval"] = evaluate_vq(vq, args.eval_scenes) if args.eval_scenes else {}
    save_vq(vq, args.out, info)
    print(json.dumps(info, indent=1))
    size_mb = Path(args.out).stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB) after {info['train_seconds']} s of training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
