"""Training configuration as dataclasses with TRL's names; every field is a YAML key and a CLI flag.

`--num-generations 16` and `--num_generations 16` are both accepted; precedence is CLI > YAML > default.
Everything is validated before any model is built, so a typo costs a second, not a rollout.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams

LM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# product / sum of the four components, or one component alone (R_PI, R_sem, R_spa, R_RI)
REWARD_COMBINATIONS = ("product", "sum", "R_PI", "R_sem", "R_spa", "R_RI")
IMAGE_LOGPROBS = ("conditional", "guided")
SCALE_REWARDS = ("group", "batch", "none")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")  # transformers' `get_scheduler` names


@dataclass
class TrainConfig:
    """What SFT and GRPO share: optimisation, LoRA, checkpoints, logging."""

    output_dir: str = "runs/gotr1"
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    use_lora: bool = True
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = LM_LORA_TARGETS  # a regex or module names, as peft takes them
    seed: int = 0
    save_steps: int = 50
    logging_steps: int = 1
    sample_steps: int = 25
    dtype: str = "float32"

    def validate(self) -> None:
        checks = {
            "learning_rate must be > 0": self.learning_rate > 0,
            f"lr_scheduler_type must be one of {LR_SCHEDULERS}": self.lr_scheduler_type in LR_SCHEDULERS,
            # transformers' 'constant' ignores warmup_steps: a warm-up asked for must not silently vanish
            "warmup_steps needs lr_scheduler_type='constant_with_warmup', not 'constant'":
                self.warmup_steps == 0 or self.lr_scheduler_type != "constant",
            "warmup_steps must be >= 0": self.warmup_steps >= 0,
            "max_steps must be >= 1": self.max_steps >= 1,
            "gradient_accumulation_steps must be >= 1": self.gradient_accumulation_steps >= 1,
            "max_grad_norm must be > 0": self.max_grad_norm > 0,
            "lora_r must be >= 1": self.lora_r >= 1,
            "lora_alpha must be > 0": self.lora_alpha > 0,
            "lora_dropout must be in [0, 1)": 0 <= self.lora_dropout < 1,
            "save_steps must be >= 1": self.save_steps >= 1,
            "logging_steps must be >= 1": self.logging_steps >= 1,
            "sample_steps must be >= 0": self.sample_steps >= 0,
            "dtype must be float32, bfloat16 or float16": self.dtype in ("float32", "bfloat16", "float16"),
        }
        _raise_failed(checks)


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO as GoT-R1 runs it (N=16, LoRA 32/32, lr 1e-5 cosine, CFG 5, 600 reasoning tokens)."""

    output_dir: str = "runs/grpo"
    num_generations: int = 16
    prompts_per_step: int = 8
    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    max_reasoning_tokens: int = 600
    cfg_weight: float = 5.0
    text_temperature: float = 1.0
    image_temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Which image-token distribution the loss trains: "conditional" (T2I-R1, GoT-R1) or "guided", the CFG-mixed
    # one the tokens are sampled from (ReasonGen-R1; one more forward of the unconditional rows per step).
    image_logprobs: str = "conditional"
    reward_combination: str = "product"
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    judge: str = "tiny-qwen"
    # Groups whose rewards are all equal have zero advantages: leave them out of the update (DAPO's dynamic
    # sampling, without resampling). One process only: under torchrun every rank must run the same collectives
    # and micro-batches, so there all samples train, as in TRL (zero advantage; only the KL term and the
    # normaliser see them).
    skip_zero_variance_groups: bool = True
    kv_cache_memory_bytes: int = 512 * 2**20

    def validate(self) -> None:
        super().validate()
        checks = {
            "num_generations must be >= 2 (a group needs a baseline)": self.num_generations >= 2,
            "prompts_per_step must be >= 1": self.prompts_per_step >= 1,
            "num_iterations must be >= 1": self.num_iterations >= 1,
            "beta must be >= 0": self.beta >= 0,
            "epsilon must be in (0, 1)": 0 < self.epsilon < 1,
            "epsilon_high must be > 0": self.epsilon_high is None or self.epsilon_high > 0,
            f"loss_type must be one of {LOSS_TYPES}": self.loss_type in LOSS_TYPES,
            f"scale_rewards must be one of {SCALE_REWARDS}": self.scale_rewards in SCALE_REWARDS,
            "max_reasoning_tokens must be >= 1": self.max_reasoning_tokens >= 1,
            **_sampling_checks(self),
            f"image_logprobs must be one of {IMAGE_LOGPROBS}": self.image_logprobs in IMAGE_LOGPROBS,
            f"reward_combination must be one of {REWARD_COMBINATIONS}": self.reward_combination in REWARD_COMBINATIONS,
            "reward_weights must hold 4 numbers (R_PI, R_sem, R_spa, R_RI)": len(self.reward_weights) == 4,
            "prompts_per_step * num_generations must be divisible by gradient_accumulation_steps":
                (self.prompts_per_step * self.num_generations) % self.gradient_accumulation_steps == 0,
            "kv_cache_memory_bytes must be > 0": self.kv_cache_memory_bytes > 0,
        }
        _raise_failed(checks)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised GoT training on (prompt, chain, image) triples, before GRPO as in GoT-R1."""

    output_dir: str = "runs/sft"
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 8
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        _raise_failed({
            "per_device_train_batch_size must be >= 1": self.per_device_train_batch_size >= 1,
            "loss weights must be >= 0": self.text_loss_weight >= 0 and self.image_loss_weight >= 0,
        })


@dataclass
class EvalConfig:
    """Held-out evaluation sampling: `n` per prompt, prompt `i` seeded `seed + i`, so every model is measured on
    the same draws (defaults: the shapes world's on-policy settings)."""

    n: int = 4
    seed: int = 0
    text_temperature: float = 1.0
    image_temperature: float = 1.0
    cfg_weight: float = 1.0
    max_reasoning_tokens: int = 96
    reward_combination: str = "product"

    def validate(self) -> None:
        _raise_failed({
            "n must be >= 1": self.n >= 1,
            "max_reasoning_tokens must be >= 1": self.max_reasoning_tokens >= 1,
            **_sampling_checks(self),
            f"reward_combination must be one of {REWARD_COMBINATIONS}": self.reward_combination in REWARD_COMBINATIONS,
        })


def sampling_params(config: GRPOConfig | EvalConfig, *, n: int, seed: int, **overrides: Any) -> SamplingParams:
    """The engine's settings for one request: the `SamplingParams` fields `config` declares (the rest at their
    defaults, or `overrides`), with the request's group size and seed (a config's own `n`/`seed` mean something
    else)."""
    from engine.sampling_params import SamplingParams  # the engine (torch, transformers) only when sampling

    names = {f.name for f in fields(SamplingParams)} & {f.name for f in fields(config)} - {"n", "seed"}
    return SamplingParams(n=n, seed=seed, **({name: getattr(config, name) for name in names} | overrides))


def _sampling_checks(config: GRPOConfig | EvalConfig) -> dict[str, bool]:
    """`SamplingParams`'s own checks of the sampling fields, as a failed check (its message) or none."""
    try:
        sampling_params(config, n=1, seed=0)
    except ValueError as exc:
        return {str(exc): False}
    return {}


def _raise_failed(checks: dict[str, bool]) -> None:
    failed = [msg for msg, ok in checks.items() if not ok]
    if failed:
        raise ValueError("invalid configuration: " + "; ".join(failed))


def _field_parser(tp: Any):
    """argparse `type=` and `nargs` for a dataclass field's annotation (bool, int, float, str, optional, list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        convert, nargs = _field_parser(inner)
        return (lambda s: None if s.lower() == "none" else convert(s)), nargs
    if origin is list:
        return args[0], "+"
    if tp is bool:
        def to_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes"):
                return True
            if s.lower() in ("0", "false", "no"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
        return to_bool, None
    return tp, None


def _yaml_value(path: Path, name: str, value: Any, tp: Any) -> Any:
    """A YAML value as its field's type: YAML 1.1 reads `1e-5` (no dot) as a string, so strings are converted as a
    flag's would be; anything else of the wrong type is refused here, not met as a TypeError in `validate`."""
    convert, nargs = _field_parser(tp)
    if isinstance(value, str) and nargs is None:
        try:
            value = convert(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{path}: {name}: {e}") from e
    if not _fits(value, tp):
        raise ValueError(f"{path}: {name} must be {tp}, got {value!r}")
    return float(value) if tp is float and type(value) is int else value


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if tp is float:
        return type(value) in (int, float)
    return value is None if tp is type(None) else type(value) is tp


def add_config_args(parser: argparse.ArgumentParser, cls: type, presets: dict[str, dict[str, Any]] | None = None
                    ) -> None:
    """One flag per field, in both spellings; defaults stay unset so YAML values are not overridden. The help
    names the class default and, per preset in `presets` that sets the field, that preset's."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        convert, nargs = _field_parser(hints[f.name])
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        shown = [f"default: {_default(f)}"] + [f"--preset {name}: {values[f.name]}"
                                               for name, values in (presets or {}).items() if f.name in values]
        parser.add_argument(*flags, dest=f.name, type=convert, nargs=nargs, default=argparse.SUPPRESS,
                            help=f"({'; '.join(shown)})")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build_config(cls: type, args: argparse.Namespace, config_file: str | None = None,
                 defaults: dict[str, Any] | None = None):
    """The class's defaults, then `defaults` (a preset's), then the YAML file, then CLI flags; unknown YAML keys
    and invalid values raise."""
    import yaml

    values: dict[str, Any] = dict(defaults or {})
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of field: value")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(loaded) - set(hints))
        if unknown:
            raise ValueError(f"{path}: unknown fields {', '.join(unknown)}")
        values.update({name: _yaml_value(path, name, value, hints[name]) for name, value in loaded.items()})
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    config = cls(**values)
    config.validate()
    return config
