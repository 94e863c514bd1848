import argparse
import dataclasses

import pytest
import torch

from engine.sampling_params import SamplingParams
from gotr1.config import EvalConfig, GRPOConfig, SFTConfig, add_config_args, build_config, sampling_params


def parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser, cls)
    return parser.parse_args(argv)


def test_defaults_follow_got_r1_and_trl():
    c = GRPOConfig()
    assert (c.num_generations, c.learning_rate, c.lr_scheduler_type, c.lora_r, c.lora_alpha) == (16, 1e-5, "cosine",
                                                                                                   32, 32)
    assert (c.max_reasoning_tokens, c.cfg_weight, c.text_temperature, c.image_temperature) == (600, 5.0, 1.0, 1.0)
    assert (c.epsilon, c.epsilon_high, c.loss_type, c.scale_rewards, c.beta) == (0.2, None, "dapo", "group", 0.0)
    assert "vision" not in c.lora_target_modules and "language_model" in c.lora_target_modules


def test_both_spellings_and_yaml_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("num_generations: 8\nbeta: 0.04\nreward_weights: [1, 2, 3, 4]\n")
    args = parse(GRPOConfig, ["--num-generations", "4", "--epsilon_high", "0.28", "--use-lora", "false"])
    c = build_config(GRPOConfig, args, str(yaml_file))
    assert (c.num_generations, c.beta, c.epsilon_high, c.use_lora) == (4, 0.04, 0.28, False)
    assert c.reward_weights == [1, 2, 3, 4]
    args = parse(GRPOConfig, ["--num_generations", "6", "--epsilon-high", "none"])
    c = build_config(GRPOConfig, args)
    assert c.num_generations == 6 and c.epsilon_high is None


def test_precedence_is_class_default_then_preset_then_yaml_then_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("learning_rate: 1.0e-3\nlora_r: 8\n")
    preset = {"learning_rate": 2e-4, "max_steps": 5, "lora_r": 16, "beta": 0.5}
    c = build_config(GRPOConfig, parse(GRPOConfig, ["--lora-r", "4"]), str(yaml_file), preset)
    assert (c.learning_rate, c.max_steps, c.lora_r, c.beta, c.num_generations) == (1e-3, 5, 4, 0.5, 16)


def test_yaml_values_take_their_fields_types(tmp_path):
    """YAML 1.1 reads `1e-5` (no dot) as a string: converted as a flag would be. Values of the wrong type are
    refused naming the field, not met as a TypeError inside `validate`."""
    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 1e-5\nbeta: 1e-3\nepsilon_high: null\nmax_steps: 10\n"
                    "lora_target_modules: [q_proj, v_proj]\n")
    c = build_config(GRPOConfig, parse(GRPOConfig, []), str(good))
    assert (c.learning_rate, c.beta, c.epsilon_high, c.max_steps) == (1e-5, 1e-3, None, 10)
    assert c.lora_target_modules == ["q_proj", "v_proj"]
    good.write_text("max_grad_norm: 2\nbeta: 0\n")  # YAML ints in float fields become floats, as flags would
    c = build_config(GRPOConfig, parse(GRPOConfig, []), str(good))
    assert (c.max_grad_norm, c.beta) == (2.0, 0.0) and type(c.max_grad_norm) is type(c.beta) is float
    bad = tmp_path / "bad.yaml"
    for text, match in (("max_steps: ten\n", "max_steps: invalid literal"), ("learning_rate: [1]\n", "learning_rate"),
                        ("use_lora: 3\n", "use_lora must be"), ("max_steps: 2.5\n", "max_steps must be"),
                        ("max_steps: true\n", "max_steps must be")):  # a YAML bool is no int
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            build_config(GRPOConfig, parse(GRPOConfig, []), str(bad))


def test_invalid_values_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="loss_type must be one of"):
        build_config(GRPOConfig, parse(GRPOConfig, ["--loss-type", "ppo"]))
    with pytest.raises(ValueError, match="num_generations must be >= 2.*top_p must be in"):
        build_config(GRPOConfig, parse(GRPOConfig, ["--num-generations", "1", "--top-p", "1.5"]))
    with pytest.raises(ValueError, match="divisible by gradient_accumulation_steps"):
        build_config(GRPOConfig, parse(GRPOConfig, ["--prompts-per-step", "1", "--num-generations", "3",
                                                    "--gradient-accumulation-steps", "2"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_generation: 8\n")
    with pytest.raises(ValueError, match="unknown fields num_generation"):
        build_config(GRPOConfig, parse(GRPOConfig, []), str(bad))
    with pytest.raises(FileNotFoundError):
        build_config(GRPOConfig, parse(GRPOConfig, []), str(tmp_path / "none.yaml"))
    with pytest.raises(SystemExit):
        parse(GRPOConfig, ["--use-lora", "maybe"])
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        build_config(SFTConfig, parse(SFTConfig, ["--per-device-train-batch-size", "0"]))
    with pytest.raises(ValueError, match="reward_weights must hold 4 numbers"):
        build_config(GRPOConfig, parse(GRPOConfig, ["--reward-weights", "1", "1", "1"]))
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        build_config(SFTConfig, parse(SFTConfig, ["--max-grad-norm", "0"]))
    with pytest.raises(ValueError, match="warmup_steps needs lr_scheduler_type='constant_with_warmup'"):
        build_config(GRPOConfig, parse(GRPOConfig, ["--lr-scheduler-type", "constant", "--warmup-steps", "5"]))


def test_constant_with_warmup_warms_up_then_holds():
    from gotr1.training import lr_scheduler

    config = GRPOConfig(learning_rate=1.0, lr_scheduler_type="constant_with_warmup", warmup_steps=4)
    config.validate()
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = lr_scheduler(optimizer, config, 10)
    rates = []
    for _ in range(7):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_grpo_sampling_defaults_are_the_engines():
    """GoT-R1's sampling settings are written twice, in `GRPOConfig` (torch-free, for the CLI's parser) and in the
    engine's `SamplingParams`: a GRPO run left at its defaults samples as the engine does by default."""
    p = sampling_params(GRPOConfig(), n=SamplingParams().n, seed=0)
    assert dataclasses.replace(p, seed=None) == SamplingParams()
    assert GRPOConfig().num_generations == SamplingParams().n


def test_sampling_fields_become_the_engines_sampling_params():
    """The configs' sampling fields reach the engine as they are (the request's own n and seed, never the training
    seed), and are checked by `SamplingParams` itself, with the other failures."""
    c = GRPOConfig(seed=123, text_temperature=0.7, image_temperature=1.3, top_k=40, top_p=0.9, cfg_weight=4.0,
                   max_reasoning_tokens=50)
    p = sampling_params(c, n=16, seed=7)
    assert (p.n, p.seed, p.text_temperature, p.image_temperature, p.top_k, p.top_p, p.cfg_weight,
            p.max_reasoning_tokens) == (16, 7, 0.7, 1.3, 40, 0.9, 4.0, 50)
    e = sampling_params(EvalConfig(n=4, seed=9, cfg_weight=2.0), n=4, seed=10)
    assert (e.n, e.seed, e.cfg_weight, e.top_k, e.top_p, e.max_reasoning_tokens) == (4, 10, 2.0, 0, 1.0, 96)
    with pytest.raises(ValueError, match="loss_type must be one of.*image_temperature must be 0 .greedy. or in"):
        GRPOConfig(loss_type="ppo", image_temperature=-1.0).validate()
    with pytest.raises(ValueError, match="n must be >= 1.*text_temperature must be 0 .greedy. or in"):
        EvalConfig(n=0, text_temperature=-0.5).validate()
