import json
import math

import pytest
import torch

from gotr1.config import GRPOConfig
from gotr1.grpo import GRPOTrainer
from gotr1.model import build_preset
from gotr1.rewards import CodebookSubsetJudge, RewardBreakdown

PROMPTS = ["a red circle", "two blue squares", "a cat left of a dog", "three stars"]


def small_config(tmp_path, **kw) -> GRPOConfig:
    base = {"output_dir": str(tmp_path), "num_generations": 4, "prompts_per_step": 2, "max_reasoning_tokens": 3,
            "learning_rate": 2e-2, "lora_r": 4, "lora_alpha": 8, "max_steps": 4, "save_steps": 2, "seed": 0,
            "judge": "codebook:512", "lr_scheduler_type": "constant"}
    base.update(kw)
    return GRPOConfig(**base)


def make_trainer(tmp_path, judge=None, **kw) -> GRPOTrainer:
    bundle = build_preset("tiny", image_size=64)
    return GRPOTrainer(small_config(tmp_path, **kw), bundle, PROMPTS, judge or CodebookSubsetJudge(512))


def test_mean_reward_rises_on_an_exact_reward(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=12, num_generations=8, learning_rate=1e-2, save_steps=100,
                           sample_steps=6)
    history = trainer.train()
    rewards = [h["reward/mean"] for h in history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.4, rewards  # the reward is 2 x the share of image tokens below 512, 1.0 at random
    assert (tmp_path / "reward_curves.png").is_file()
    for step in (6, 12):  # every sample_steps: the first group's images, chains and layout overlays
        assert len(list((tmp_path / "samples" / f"step-{step}").glob("p000_s*_layout.png"))) == 8
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for key in ("reward/R_PI_mean", "reward/R_PI_std", "advantage/std", "loss", "grad_norm", "kl",
                "clip_ratio/low_mean", "parity/logprob_diff_max", "time/rollout", "time/reward", "time/train",
                "tokens_per_s/rollout"):
        assert key in lines[0], key


@pytest.mark.parametrize("image_logprobs", ["conditional", "guided"])
def test_engine_and_trainer_logprobs_agree(tmp_path, image_logprobs):
    """At CFG 5 the trainer's image log-probs are the engine's conditional ones, or with `image_logprobs="guided"`
    its CFG-mixed ones (the two differ by far more than the bound)."""
    trainer = make_trainer(tmp_path, max_steps=2, beta=0.04, image_logprobs=image_logprobs)
    history = trainer.train()
    sample = trainer._last_groups[0].samples[0]
    assert (sample.image_logprobs - sample.image_mixed_logprobs).abs().max() > 0.1
    for h in history:
        assert h["parity/logprob_diff_max"] < 1e-4, h
        assert math.isfinite(h["kl"]) and h["kl"] >= 0


def test_resume_gives_the_same_parameters_and_metrics(tmp_path):
    full = make_trainer(tmp_path / "full")
    full_history = full.train()
    part = make_trainer(tmp_path / "part")
    part.train(max_steps=2)
    resumed = make_trainer(tmp_path / "part")
    resumed.resume(tmp_path / "part")
    assert resumed.step == 2
    resumed_history = resumed.train()
    drop = ("time/", "tokens_per_s/")
    clean = [{k: v for k, v in h.items() if not k.startswith(drop)} for h in resumed_history]
    assert clean == [{k: v for k, v in h.items() if not k.startswith(drop)} for h in full_history]
    for (n1, p1), (n2, p2) in zip(full.bundle.model.named_parameters(), resumed.bundle.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


class ConstantJudge:
    def score(self, samples):
        ones = torch.ones(len(samples))
        return RewardBreakdown(R_PI=ones * 0.5, R_sem=ones, R_spa=ones, R_RI=ones)


def test_zero_variance_groups_are_logged_and_skipped(tmp_path):
    trainer = make_trainer(tmp_path, judge=ConstantJudge(), max_steps=2)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    assert all(h["groups/zero_variance"] == 2 and h["groups/trained"] == 0 for h in history)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert (tmp_path / "checkpoint-2").is_dir()


class NaNJudge:
    def score(self, samples):
        values = torch.ones(len(samples))
        values[1] = float("nan")
        return RewardBreakdown(R_PI=values, R_sem=values, R_spa=values, R_RI=values)


def test_nan_reward_is_a_clear_error_and_keeps_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_steps=1)
    trainer.train(max_steps=1)
    trainer.judge = NaNJudge()
    with pytest.raises(ValueError, match="finite"):
        trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "latest").read_text().strip() == "checkpoint-1"


def test_bad_prompt_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tmp_path).__class__(small_config(tmp_path), build_preset("tiny", image_size=64), [],
                                         CodebookSubsetJudge(4))
    from gotr1.cli import main

    assert main(["train", "--preset", "tiny", "--prompts", str(tmp_path / "missing.txt")]) == 2


def test_two_process_gloo_run_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 gotr1 train` (prompts sharded, gradients all-reduced by DDP) gives the same
    adapter as one process with the same global batch."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from gotr1.model import save_bundle

    save_bundle(build_preset("tiny", image_size=64), tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["train", "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt"),
              "--num-generations", "4", "--prompts-per-step", "2", "--max-reasoning-tokens", "3", "--max-steps", "2",
              "--learning-rate", "2e-2", "--lora-r", "4", "--lora-alpha", "8", "--judge", "codebook:512",
              "--lr-scheduler-type", "constant", "--loss-type", "grpo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bindir = os.path.dirname(sys.executable)
    one = subprocess.run([os.path.join(bindir, "gotr1"), *common, "--output-dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as sock:  # a free port: a fixed one can still be held by an earlier run
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    two = subprocess.run([os.path.join(bindir, "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", port,
                          os.path.join(bindir, "gotr1"), *common, "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "checkpoint-2" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint-2" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(m1, m2):
        assert abs(x["reward/mean"] - y["reward/mean"]) < 1e-6
