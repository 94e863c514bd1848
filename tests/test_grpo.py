import json
import math
from pathlib import Path

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
    assert trainer.scheduler.last_epoch == 2  # the learning rate still follows the step count


def test_a_run_that_trains_no_group_for_long_says_so_once(tmp_path, monkeypatch):
    """The product reward with a component stuck at 0 gives every group zero variance: the run must say that it is
    learning nothing (once, not every step), not only log it."""
    monkeypatch.setattr("gotr1.grpo.STALL_WARNING_STEPS", 2)
    trainer = make_trainer(tmp_path, judge=ConstantJudge(), max_steps=4, save_steps=100)
    with pytest.warns(RuntimeWarning, match="the reward teaches nothing") as caught:
        trainer.train()
    assert len([w for w in caught if "teaches nothing" in str(w.message)]) == 1


def test_saving_a_step_again_never_deletes_the_checkpoint_latest_names(tmp_path, monkeypatch):
    """A run resumed from an earlier checkpoint saves a step that exists: the old one is renamed aside before the
    new one takes its name, so a crash mid-delete cannot leave `latest` naming a partial directory."""
    import shutil

    trainer = make_trainer(tmp_path, max_steps=2, save_steps=1)
    trainer.train()
    resumed = make_trainer(tmp_path, max_steps=2, save_steps=1)
    resumed.resume(tmp_path / "checkpoint-1")
    deleted = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (deleted.append(Path(p).name), real_rmtree(p, *a, **k)))
    resumed.train()
    assert deleted == [".checkpoint-2.old"]
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2"


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


RANK_SCRIPT = """
import sys, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_grpo import ConstantJudge, make_trainer
from gotr1.rewards import CodebookSubsetJudge
dist.init_process_group("gloo")
rank = dist.get_rank()
trainer = make_trainer({out!r}, judge=ConstantJudge() if rank == 0 else CodebookSubsetJudge(512), max_steps=1,
                       save_steps=1)
history = trainer.train()
print("rank", rank, "zero_variance", history[0]["groups/zero_variance"], "loss" in history[0], flush=True)
dist.destroy_process_group()
"""


def test_two_ranks_with_zero_variance_groups_on_one_rank_only_finish(tmp_path):
    """Skipping a rank's zero-variance groups would leave it out of DDP's backward and the token all-reduce while
    the other rank waits there: under torchrun every sample trains (zero advantage), and the step completes."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path / "out")))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", port, str(script)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # rank 0's 1 zero-variance group (of 1) and rank 1's (0 of 1) averaged; both ranks ran the loss
    assert sorted(run.stdout.split("\n")[:2]) == ["rank 0 zero_variance 0.5 True", "rank 1 zero_variance 0.5 True"]
    assert (tmp_path / "out" / "checkpoint-1").is_dir()


class FailingJudge(CodebookSubsetJudge):
    """Scores `calls` batches, then dies as a crashed run would."""

    def __init__(self, calls: int):
        super().__init__(512)
        self.calls = calls

    def score(self, samples):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("judge died")
        return super().score(samples)


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    """Steps logged after the last checkpoint are run again on resume: metrics.jsonl must not hold them twice."""
    crashed = make_trainer(tmp_path, judge=FailingJudge(3))  # checkpoint at step 2, step 3 logged, dies in step 4
    with pytest.raises(RuntimeError, match="judge died"):
        crashed.train()
    resumed = make_trainer(tmp_path)
    resumed.resume(tmp_path)
    assert resumed.step == 2
    resumed.train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]


def test_kl_without_lora_is_refused_before_any_rollout(tmp_path):
    """The reference model is the policy with its LoRA adapter disabled; full fine-tuning has none to disable."""
    with pytest.raises(ValueError, match="beta > 0 needs use_lora"):
        make_trainer(tmp_path, beta=0.04, use_lora=False)


def test_checkpoint_files_reach_the_disk_before_latest_names_them(tmp_path, monkeypatch):
    """A power cut must not leave `latest` naming a checkpoint whose weights were never flushed: every file of the
    checkpoint, its directory, the run directory and `latest` are fsynced, each before the rename that publishes it."""
    import os

    trainer = make_trainer(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    final = trainer.save()
    tmp = tmp_path / f".{final.name}.tmp"
    publish = events.index(("replace", str(tmp)))
    synced = {p for kind, p in events[:publish] if kind == "fsync"}
    assert {str(tmp / f.name) for f in final.iterdir()} | {str(tmp)} <= synced
    latest_tmp = str(tmp_path / ".latest.tmp")
    assert events.index(("fsync", latest_tmp)) < events.index(("replace", latest_tmp))
    assert ("fsync", str(tmp_path)) in events[events.index(("replace", latest_tmp)):]
