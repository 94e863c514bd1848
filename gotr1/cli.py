"""`gotr1` command line: generate GoT samples (image + chain + layout overlay) from a preset or local weights."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from gotr1.model import PRESETS


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=PRESETS, help="a built-in model (no weights needed)")
    group.add_argument("--model", metavar="DIR", help="a local Janus-Pro directory in Hugging Face format")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def load_from_args(args: argparse.Namespace):
    import torch

    from gotr1.model import load_model

    return load_model(args.preset, args.model, dtype=getattr(torch, args.dtype), device=args.device)


def save_sample(out_dir: Path, stem: str, *, prompt: str, reasoning_text: str, chain, image) -> dict:
    """Write `stem.png` (image), `stem_chain.txt` and `stem_layout.png` (boxes over and beside the image)."""
    from gotr1.chain import layout_overlay

    (out_dir / f"{stem}_chain.txt").write_text(reasoning_text + "\n")
    record = {"prompt": prompt, "reasoning": reasoning_text,
              "objects": [asdict(o) for o in chain.objects], "problems": chain.problems}
    if image is not None:
        image.save(out_dir / f"{stem}.png")
        layout_overlay(image, chain.objects).save(out_dir / f"{stem}_layout.png")
        record["image"] = f"{stem}.png"
        record["layout"] = f"{stem}_layout.png"
    return record


def cmd_generate(args: argparse.Namespace) -> int:
    from gotr1.reference import ReferenceGenerator

    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or --prompts FILE")
    bundle = load_from_args(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    groups = ReferenceGenerator(bundle).generate(
        prompts, n=args.n, text_temperature=args.text_temperature, image_temperature=args.image_temperature,
        top_k=args.top_k, top_p=args.top_p, cfg_weight=args.cfg_weight,
        max_reasoning_tokens=args.max_reasoning_tokens, seed=args.seed, progress=True)
    elapsed = time.perf_counter() - start
    with open(out_dir / "samples.jsonl", "w") as f:
        for p, group in enumerate(groups):
            for s, sample in enumerate(group):
                record = save_sample(out_dir, f"p{p:03d}_s{s:02d}", prompt=sample.prompt,
                                     reasoning_text=sample.reasoning_text, chain=sample.chain, image=sample.image)
                f.write(json.dumps(record) + "\n")
    total = sum(len(g) for g in groups)
    print(f"wrote {total} samples (image, chain, layout) to {out_dir} in {elapsed:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gotr1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="plan (reasoning chain with boxes) then draw images")
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", default=[], help="caption; repeat for several")
    gen.add_argument("--prompts", metavar="FILE", help="a text file, one caption per line")
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="out", help="output directory")
    gen.add_argument("--text-temperature", type=float, default=1.0)
    gen.add_argument("--image-temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--cfg-weight", type=float, default=5.0)
    gen.add_argument("--max-reasoning-tokens", type=int, default=600)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
