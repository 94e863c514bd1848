"""The `shapes` preset: the world's SFT checkpoint (shipped in `assets/`) and its data splits.

`--preset shapes` is `build_shapes_base()` (tokenizer, geometry, the trained VQ) with `assets/sft.safetensors`
loaded into everything but the VQ, which is its own asset. `gotr1 sft --preset shapes` trains that checkpoint
from the untrained base on the world's training scenes; `SFT_COMMAND` rebuilds the shipped file exactly as it was
made. The settings commands use on it are in `defaults`; they sit under YAML and flags: a user who passes
`--learning-rate` still gets it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gotr1.model import JanusBundle
from gotr1.sft import SFTExample
from gotr1.shapes.base import build_shapes_base, sft_examples
from gotr1.shapes.vq import DEFAULT_VQ_PATH
from gotr1.shapes.world import split_scenes

SFT_PATH = DEFAULT_VQ_PATH.parent / "sft.safetensors"
SFT_SCENES = 10_000  # training scenes for SFT (validation prompts are never among them, not even paraphrased)
VAL_SCENES = 200  # the held-out split every before/after table is measured on
GRPO_SCENES = 2_000  # the GRPO prompt pool: the first scenes of the same training split
SFT_COMMAND = ("gotr1 sft --preset shapes --output-dir runs/shapes-sft "
               "--export gotr1/shapes/assets/sft.safetensors")
_VQ_PREFIX = "model.vqmodel."


def load_shapes(trained: bool = True, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", path: str | Path = SFT_PATH) -> JanusBundle:
    """The shapes model: after SFT (`trained`, from `path`) or the untrained base SFT starts from."""
    bundle = build_shapes_base()
    if trained:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"the shapes SFT checkpoint {path} is missing; rebuild it with: {SFT_COMMAND}")
        missing, unexpected = bundle.model.load_state_dict(load_file(path), strict=False)
        missing = [k for k in missing if not k.startswith(_VQ_PREFIX)]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the shapes model: missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}; rebuild it with: {SFT_COMMAND}")
        bundle.name = "shapes"
    else:
        bundle.name = "shapes-base"
    bundle.model.to(device=device, dtype=dtype).eval()
    return bundle


def save_sft_weights(bundle: JanusBundle, path: str | Path, info: dict | None = None) -> Path:
    """Everything but the VQ (shipped apart) as one safetensors file, written atomically; `info` (how it was
    trained) goes into the file's metadata, where `sft_info` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: tied weights share storage, which safetensors refuses to write twice
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous()
             for k, v in bundle.model.state_dict().items() if not k.startswith(_VQ_PREFIX)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp, metadata={"gotr1": json.dumps(info or {})})
    os.replace(tmp, path)
    return path


def sft_info(path: str | Path = SFT_PATH) -> dict:
    """The training record stored with a checkpoint by `save_sft_weights` (command, steps, time, loss)."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("gotr1", "{}"))


def sft_data(bundle: JanusBundle, n_train: int | None = None, seed: int = 0) -> list[SFTExample]:
    """The SFT examples: the training split's scenes (`SFT_SCENES` by default) as (prompt, ground-truth chain,
    VQ codes of the render)."""
    train, _ = split_scenes(seed, n_train or SFT_SCENES, VAL_SCENES)
    return sft_examples(train, bundle)


def split_prompts(split: str, seed: int = 0) -> list[str]:
    """`train` (the GRPO pool) or `val` (held out from SFT and GRPO alike) prompts of the fixed split."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = split_scenes(seed, GRPO_SCENES, VAL_SCENES)
    return [s.prompt for s in (train if split == "train" else val)]
