"""`gotr1` command line: generate GoT samples, SFT, GRPO training (also under torchrun)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

from gotr1.config import EvalConfig, GRPOConfig, SFTConfig, add_config_args, build_config
from gotr1.model import PRESETS
from gotr1.shapes import defaults as shapes_defaults


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=PRESETS, help="a built-in model (no weights needed)")
    group.add_argument("--model", metavar="DIR", help="a local Janus-Pro directory in Hugging Face format")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def load_from_args(args: argparse.Namespace, dtype: str = "float32"):
    import torch

    from gotr1.model import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.preset, args.model, dtype=getattr(torch, dtype), device=device)


def read_prompt_args(args: argparse.Namespace, default_split: str | None = None, option: str = "prompts"
                     ) -> list[str]:
    """`--prompt` (repeatable) and `--prompts FILE` (or another file option); without them the shapes world's
    `default_split` when given."""
    from gotr1.data import read_prompts

    prompts = list(getattr(args, "prompt", [])) if option == "prompts" else []
    if getattr(args, option, None):
        prompts += read_prompts(getattr(args, option))
    if not prompts and default_split is not None:
        from gotr1.shapes.preset import split_prompts

        return split_prompts(default_split)
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def preset_defaults(args: argparse.Namespace, table: str) -> dict:
    """What the chosen preset sets for a command, under YAML and flags: `gotr1.shapes.defaults`' `SFT_DEFAULTS`,
    `GRPO_DEFAULTS` or `SAMPLING_DEFAULTS` for `--preset shapes`, nothing for any other model."""
    return dict(getattr(shapes_defaults, table)) if args.preset == "shapes" else {}


GOT_SAMPLING = {k: getattr(GRPOConfig, k) for k in ("cfg_weight", "max_reasoning_tokens")}  # GoT-R1's


def preset_sampling(args: argparse.Namespace) -> dict[str, float]:
    """`--cfg-weight` / `--max-reasoning-tokens` as given, else the preset's (the shapes model has no
    unconditional branch and writes short chains), else GoT-R1's (CFG 5, 600 tokens)."""
    defaults = {**GOT_SAMPLING, **preset_defaults(args, "SAMPLING_DEFAULTS")}
    return {k: v if (v := getattr(args, k)) is not None else defaults[k] for k in defaults}


def check_out_dir(path: str | None) -> None:
    """Before any work: an output directory that cannot be one would fail only once the samples exist."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"output path {path} exists and is not a directory")


def check_out_file(path: str | None) -> None:
    """Before any work: an output file that is a directory would fail only once the scores exist."""
    if path is not None and Path(path).is_dir():
        raise IsADirectoryError(f"output file {path} is a directory")


def check_resume(args: argparse.Namespace) -> None:
    """Before the model (and a judge) load: a `--resume` path that holds no checkpoint."""
    if args.resume:
        from gotr1.checkpoint import resolve_checkpoint

        resolve_checkpoint(args.resume)


def yaml_error_line(error: Exception) -> str:
    """PyYAML's message on one line: what it was parsing and what it found, each with its line and column."""
    parts = []
    for what, mark in (("context", "context_mark"), ("problem", "problem_mark")):
        text, where = getattr(error, what, None), getattr(error, mark, None)
        if text:
            parts.append(text + (f" (line {where.line + 1}, column {where.column + 1})" if where else ""))
    return ": ".join(parts) or " ".join(str(error).split())


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.sampling_params import SamplingParams
    from gotr1.artifacts import save_groups

    check_out_dir(args.out)
    prompts = read_prompt_args(args)
    settings = {"text_temperature": args.text_temperature, "image_temperature": args.image_temperature,
                "top_k": args.top_k, "top_p": args.top_p, **preset_sampling(args)}
    # checked before the model loads, for either backend
    params = [SamplingParams(n=args.n, seed=args.seed + i, **settings) for i in range(len(prompts))]
    if args.backend == "reference" and settings["cfg_weight"] <= 1:
        raise ValueError(f"--backend reference needs --cfg-weight > 1 (transformers' Janus image generation always "
                         f"runs CFG), got {settings['cfg_weight']}")
    bundle = load_from_args(args, args.dtype)
    start = time.perf_counter()
    if args.backend == "reference":
        from gotr1.reference import ReferenceGenerator

        groups = ReferenceGenerator(bundle).generate(prompts, n=args.n, seed=args.seed, progress=True, **settings)
    else:
        from engine import LLMEngine

        groups = LLMEngine(bundle).generate(prompts, params)
    elapsed = time.perf_counter() - start
    total = save_groups(Path(args.out), groups)
    print(f"wrote {total} samples (image, chain, layout) to {args.out} in {elapsed:.2f} s")
    return 0


def init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (NCCL on GPUs, gloo on CPUs)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def cmd_train(args: argparse.Namespace) -> int:
    import gc

    config = build_config(GRPOConfig, args, args.config, preset_defaults(args, "GRPO_DEFAULTS"))
    device = None
    try:
        device = init_distributed()
        steps, rank = _train(args, config, device)
    finally:
        if device is not None:
            # The trainer (its DDP reducer) must be gone while the group is still registered: a reducer dropping
            # the last reference destroys the gloo group holding the GIL, which deadlocks against gloo's worker.
            import torch.distributed as dist

            gc.collect()
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: {steps} steps; metrics in {config.output_dir}/metrics.jsonl, "
              f"curves in {config.output_dir}/reward_curves.png")
    return 0


def _train(args: argparse.Namespace, config: GRPOConfig, device: str | None) -> tuple[int, int]:
    """Build, resume and run a GRPO trainer (between held-out evaluations in the shapes world); returns
    (steps, rank) so the trainer dies with this frame."""
    from gotr1.grpo import GRPOTrainer
    from gotr1.rewards import make_judge

    shapes = args.preset == "shapes"
    prompts = read_prompt_args(args, default_split="train" if shapes else None)
    if args.eval_n < 0:
        raise ValueError(f"--eval-n must be >= 0, got {args.eval_n}")
    check_resume(args)
    judge = make_judge(config.judge)  # fails now, not mid-training, when judge weights are missing
    eval_prompts = eval_config = None
    if shapes and args.eval_n > 0:
        from gotr1.shapes.world import parse_prompts

        eval_prompts = read_prompt_args(args, default_split="val", option="eval_prompts")
        parse_prompts(eval_prompts)
        # evaluated as trained: every EvalConfig field but n is the GRPOConfig field of the same name
        eval_config = EvalConfig(n=args.eval_n, **{f.name: getattr(config, f.name) for f in fields(EvalConfig)
                                                   if f.name != "n"})
    if device is not None:
        args.device = device
    bundle = load_from_args(args, config.dtype)
    trainer = GRPOTrainer(config, bundle, prompts, judge)
    if args.resume:
        trainer.resume(args.resume)
    evaluating = eval_prompts is not None and trainer.rank == 0
    if evaluating:
        before = _evaluate(trainer, eval_prompts, eval_config, "before")
    trainer.train()
    if evaluating:
        after = _evaluate(trainer, eval_prompts, eval_config, "after")
        _report(config.output_dir, {f"step {before[0]}": before[1], f"step {after[0]}": after[1]})
    return trainer.step, trainer.rank


def _evaluate(trainer, prompts: list[str], config, when: str):
    from gotr1.shapes.evaluate import evaluate

    print(f"evaluating {len(prompts)} held-out prompts x {config.n} samples {when} training (step {trainer.step})")
    return trainer.step, evaluate(trainer.bundle, prompts, config, engine=trainer.engine)


def _report(output_dir: str, results: dict) -> None:
    """Print and keep the before/after table; every sample's scores go to `eval.json`."""
    from gotr1.shapes.evaluate import format_table, write_json

    table = format_table({label: r.summary for label, r in results.items()})
    print(table)
    (Path(output_dir) / "eval_table.txt").write_text(table + "\n")
    write_json(Path(output_dir) / "eval.json", {label: r.to_json() for label, r in results.items()})


def cmd_sft(args: argparse.Namespace) -> int:
    import torch

    from gotr1.sft import SFTTrainer, read_sft_jsonl

    shapes = args.preset == "shapes"
    config = build_config(SFTConfig, args, args.config, preset_defaults(args, "SFT_DEFAULTS"))
    check_resume(args)
    if shapes:  # SFT in the shapes world starts from the untrained base, on the world's own training scenes
        from gotr1.shapes.preset import load_shapes, save_sft_weights, sft_data

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        bundle = load_shapes(trained=False, dtype=getattr(torch, config.dtype), device=device)
        examples = read_sft_jsonl(args.data, bundle) if args.data else sft_data(bundle)
    elif args.data:
        bundle = load_from_args(args, config.dtype)
        examples = read_sft_jsonl(args.data, bundle)
    else:
        raise ValueError("give --data FILE (JSONL of prompt, chain, image); only --preset shapes has its own data")
    trainer = SFTTrainer(config, bundle, examples)
    if args.resume:
        trainer.resume(args.resume)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    export = Path(args.export or Path(config.output_dir) / "final")
    if shapes and export.suffix == ".safetensors":
        info = {"command": "gotr1 " + shlex.join(args.argv),
                "steps": trainer.step, "examples": len(examples), "train_seconds": round(seconds, 1),
                "threads": torch.get_num_threads(), "final_loss": trainer.history[-1] if trainer.history else None,
                "torch": torch.__version__}
        out = save_sft_weights(trainer.merged(), export, info)
    else:
        out = trainer.export(export)
    print(f"SFT done in {seconds:.1f} s; model written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gotr1.artifacts import save_groups
    from gotr1.model import load_adapter
    from gotr1.shapes.evaluate import evaluate, format_table, write_json
    from gotr1.shapes.world import parse_prompts

    config = build_config(EvalConfig, args)
    check_out_dir(args.out)
    check_out_file(args.json)
    prompts = read_prompt_args(args, default_split="val")
    parse_prompts(prompts)  # before loading anything: a prompt outside the grammar cannot be scored
    bundle = load_from_args(args, args.dtype)
    if args.adapter:
        load_adapter(bundle, args.adapter)
    result = evaluate(bundle, prompts, config)
    print(format_table({args.adapter or bundle.name: result.summary}))
    if args.json:
        print(f"scores written to {write_json(args.json, result.to_json())}")
    if args.out:
        save_groups(Path(args.out), result.groups)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from engine.config import EngineConfig
    from gotr1.model import load_adapter
    from gotr1.serving import ServerConfig, serve

    if not 0 <= args.port <= 65535:  # like the flags below, checked before the model loads, not after by uvicorn
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    engine_config = EngineConfig(**{k: v for k, v in (("block_size", args.block_size),
                                                      ("num_kv_blocks", args.num_kv_blocks),
                                                      ("num_scheduler_steps", args.num_scheduler_steps),
                                                      ("num_image_scheduler_steps", args.num_image_scheduler_steps))
                                    if v is not None}, disable_cascade_attn=args.disable_cascade_attn,
                                 enable_pdl=args.enable_pdl)
    defaults = {f"default_{k}": v for k, v in preset_defaults(args, "SAMPLING_DEFAULTS").items()}
    config = ServerConfig(max_n=args.max_n, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                          interrupt_windows=args.interrupt_windows, **defaults)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    bundle = load_from_args(args, args.dtype or ("bfloat16" if cuda else "float32"))
    if args.adapter:
        load_adapter(bundle, args.adapter)
    serve(bundle, host=args.host, port=args.port, engine_config=engine_config, config=config)
    return 0


def add_run_args(parser: argparse.ArgumentParser, cls: type, table: str) -> None:
    """What every training command takes: a YAML config, a checkpoint to resume, and one flag per config field
    (its help naming the shapes preset's value from `table` where that preset sets it)."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML with {cls.__name__} fields (flags override it)")
    parser.add_argument("--resume", metavar="PATH", help="a checkpoint-N directory or a run directory")
    add_config_args(parser, cls, {"shapes": getattr(shapes_defaults, table)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gotr1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="plan (reasoning chain with boxes) then draw images")
    add_model_args(gen)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--prompt", action="append", default=[], help="caption; repeat for several")
    gen.add_argument("--prompts", metavar="FILE", help="a text file, one caption per line (or JSONL)")
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="out", help="output directory")
    gen.add_argument("--text-temperature", type=float, default=1.0)
    gen.add_argument("--image-temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    shapes = shapes_defaults.SAMPLING_DEFAULTS
    gen.add_argument("--cfg-weight", type=float, default=None,
                     help=f"default {GOT_SAMPLING['cfg_weight']:g} ({shapes['cfg_weight']:g} with --preset shapes)")
    gen.add_argument("--max-reasoning-tokens", type=int, default=None,
                     help=f"default {GOT_SAMPLING['max_reasoning_tokens']} ({shapes['max_reasoning_tokens']} with "
                          "--preset shapes)")
    gen.add_argument("--backend", choices=["engine", "reference"], default="engine",
                     help="our rollout engine, or transformers' generate (the reference)")
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="GRPO on the four GoT-R1 rewards (torchrun for several processes)")
    add_model_args(train)
    train.add_argument("--prompt", action="append", default=[], help="training caption; repeatable")
    train.add_argument("--prompts", metavar="FILE", help="one prompt per line, or JSONL with a 'prompt' key "
                       "(default with --preset shapes: the world's training split)")
    train.add_argument("--eval-prompts", metavar="FILE", help="--preset shapes: held-out prompts evaluated before "
                       "and after training (default: the validation split)")
    train.add_argument("--eval-n", type=int, default=4, help="--preset shapes: samples per held-out prompt; 0: none")
    add_run_args(train, GRPOConfig, "GRPO_DEFAULTS")
    train.set_defaults(func=cmd_train)

    sft = sub.add_parser("sft", help="supervised GoT training on (prompt, chain, image) triples")
    add_model_args(sft)
    sft.add_argument("--data", metavar="FILE", help='JSONL lines {"prompt", "chain", "image"} (--preset shapes: '
                     "default the world's training scenes, from the untrained base)")
    sft.add_argument("--export", metavar="PATH", help="where the merged model goes (default OUTPUT_DIR/final); "
                     "with --preset shapes a *.safetensors path writes the compact file the preset loads")
    add_run_args(sft, SFTConfig, "SFT_DEFAULTS")
    sft.set_defaults(func=cmd_sft)

    ev = sub.add_parser("eval", help="score samples for shapes-world prompts with the exact judge, per category")
    add_model_args(ev)
    ev.add_argument("--adapter", metavar="DIR", help="a peft LoRA adapter (a GRPO checkpoint-N/), merged first")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--prompt", action="append", default=[], help="caption in the shapes grammar; repeatable")
    ev.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: the held-out split)")
    ev.add_argument("--json", metavar="OUT", help="write settings, summary and every sample's scores")
    ev.add_argument("--out", metavar="DIR", help="also save every sample's image, chain and layout")
    add_config_args(ev, EvalConfig)
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve", help="HTTP server: POST /v1/generate (JSON or SSE), GET /health, GET /metrics")
    add_model_args(srv)
    srv.add_argument("--adapter", metavar="DIR", help="a peft LoRA adapter directory, merged into the model")
    srv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: bfloat16 on cuda, float32 on cpu")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-n", type=int, default=16, help="most samples one request may ask for")
    srv.add_argument("--max-queue", type=int, default=64, help="requests in flight at once; more get 429")
    srv.add_argument("--max-body-bytes", type=int, default=2**20, help="larger request bodies get 413")
    srv.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: sized to memory)")
    srv.add_argument("--block-size", type=int, default=None, help="KV block size in tokens (default: engine's)")
    srv.add_argument("--num-scheduler-steps", type=int, default=None,
                     help="decode steps per host sync (default: the engine's 16)")
    srv.add_argument("--num-image-scheduler-steps", type=int, default=None,
                     help="decode steps per host sync when every row is in the image phase and no request waits "
                          "(default: up to the first image's completion)")
    srv.add_argument("--disable-cascade-attn", action="store_true", default=None,
                     help="every decode row reads its own shared prefix (default: on a GPU; on a CPU once per run "
                          "of rows over the same blocks, as vLLM's cascade attention)")
    srv.add_argument("--enable-pdl", action="store_true",
                     help="decode-step kernels with programmatic dependent launch (a Hopper GPU; default: off)")
    srv.add_argument("--interrupt-windows", action=argparse.BooleanOptionalAction, default=True,
                     help="a request arriving during a multi-step window ends it at the next step (default: on; "
                          "off, a new request waits for the rest of the window)")
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from yaml import YAMLError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a checkpoint records as the command that made it
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input or a file system refusing: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except YAMLError as e:  # only --config is YAML
        print(f"error: {getattr(args, 'config', None)} is not valid YAML: {yaml_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
