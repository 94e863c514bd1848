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


def _spy_objective(monkeypatch) -> list[dict]:
    """Record every `grpo_objective` call of the driver: its old log-probs, advantages, batch and what it returned."""
    import gotr1.objective

    calls = []
    real = gotr1.objective.grpo_objective

    def spy(text_h, image_h, lm_head, vision_head, batch, **kw):
        loss, metrics, logp = real(text_h, image_h, lm_head, vision_head, batch, **kw)
        calls.append({"old": kw["old_logp"], "logp": logp, "batch": batch, "advantages": kw["advantages"]})
        return loss, metrics, logp

    monkeypatch.setattr(gotr1.objective, "grpo_objective", spy)
    return calls


@pytest.mark.parametrize("image_logprobs", ["conditional", "guided"])
def test_engine_and_trainer_logprobs_agree(tmp_path, monkeypatch, image_logprobs):
    """At CFG 5 the trainer's image log-probs are the engine's conditional ones, or with `image_logprobs="guided"`
    its CFG-mixed ones (the two differ by far more than the bound), at sampling temperatures other than 1. The
    reference is the policy with its adapter off, under the same temperatures: equal to the policy before the first
    update (LoRA's B starts at 0), so the first step's KL is 0 and the second's is not."""
    calls = _spy_objective(monkeypatch)
    trainer = make_trainer(tmp_path, max_steps=2, beta=0.04, image_logprobs=image_logprobs, text_temperature=0.7,
                           image_temperature=1.3)
    trainer.train(max_steps=1)
    samples = [s for g in trainer._last_groups for s in g.samples]
    expected = torch.stack([s.image_mixed_logprobs if image_logprobs == "guided" else s.image_logprobs
                            for s in samples])
    assert (samples[0].image_logprobs - samples[0].image_mixed_logprobs).abs().max() > 0.1
    torch.testing.assert_close(torch.cat([c["logp"][1] for c in calls]), expected, rtol=0, atol=1e-4)
    history = trainer.train()
    for h in history:
        assert h["parity/logprob_diff_max"] < 1e-4, h
    assert history[0]["kl"] < 1e-6 < history[1]["kl"]


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
    trainer = make_trainer(tmp_path, judge=ConstantJudge(), max_steps=2, num_iterations=2)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    assert all(h["groups/zero_variance"] == 2 and h["groups/trained"] == 0 for h in history)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert (tmp_path / "checkpoint-2").is_dir()
    assert trainer.scheduler.last_epoch == 4  # the learning rate still follows the step count (x num_iterations)


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



class DecodedCodebookJudge(CodebookSubsetJudge):
    """The codebook reward declared a pixel judge: the run that VQ-decodes every image, to compare against."""

    needs_images = True

    def score(self, samples):
        assert all(s.image is not None and s.image.size == (64, 64) for s in samples)  # a pixel judge gets pixels
        return super().score(samples)


def _count_vq_decodes(monkeypatch, bundle) -> list[int]:
    """The batch size of every VQ decode of `bundle`'s model, whoever asks for it (engine or trainer)."""
    sizes, real = [], bundle.model.decode_image_tokens
    monkeypatch.setattr(bundle.model, "decode_image_tokens",
                        lambda tokens: (sizes.append(len(tokens)), real(tokens))[1])
    return sizes


def test_a_token_judge_trains_without_decoding_images_exactly_as_a_decoding_run(tmp_path, monkeypatch):
    """`codebook:K` reads image tokens only: no rollout VQ-decodes, a sample step decodes the one group it saves,
    and the run's rewards, advantages, log-probs, metrics and updated weights are exactly those of the same run
    made to decode every image (a pixel judge), whose saved pictures are the same."""
    from PIL import Image

    calls = _spy_objective(monkeypatch)
    runs = {}
    for name, judge in (("tokens", CodebookSubsetJudge(512)), ("pixels", DecodedCodebookJudge(512))):
        calls.clear()
        trainer = make_trainer(tmp_path / name, judge=judge, max_steps=3, sample_steps=2, save_steps=100)
        decodes = _count_vq_decodes(monkeypatch, trainer.bundle)
        rewards, real = [], trainer.rewards
        monkeypatch.setattr(trainer, "rewards", lambda groups, out=rewards, real=real: (out.append(real(groups)),
                                                                                         out[-1])[1])
        history = trainer.train()
        runs[name] = trainer, history, rewards, list(calls), decodes
    (a, ha, ra, ca, da), (b, hb, rb, cb, db) = runs["tokens"], runs["pixels"]
    assert da == [4] and db == [4] * 6  # one saved group of 4 vs 2 groups x 3 steps
    assert all(s.image is None for g in a._last_groups for s in g.samples)
    drop = ("time/", "tokens_per_s/")
    assert [{k: v for k, v in h.items() if not k.startswith(drop)} for h in ha] == \
        [{k: v for k, v in h.items() if not k.startswith(drop)} for h in hb]
    assert len(ra) == len(rb) == 3 and all(torch.equal(x, y) for x, y in zip(ra, rb))
    assert len(ca) == len(cb) == 3 and len({float(c["advantages"].abs().sum()) for c in ca}) > 1
    for x, y in zip(ca, cb):
        assert torch.equal(x["advantages"], y["advantages"])
        assert all(torch.equal(u, v) for u, v in zip(x["logp"], y["logp"]))
    for (n1, p1), (n2, p2) in zip(a.bundle.model.named_parameters(), b.bundle.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    saved = [sorted((tmp_path / name / "samples" / "step-2").glob("p000_s*.png")) for name in runs]
    assert [p.name for p in saved[0]] == [p.name for p in saved[1]] and len(saved[0]) == 8  # 4 images, 4 layouts
    for x, y in zip(*saved):
        assert Image.open(x).tobytes() == Image.open(y).tobytes(), x.name
    assert all(Image.open(x).size == (64, 64) for x in saved[0] if "layout" not in x.name)


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


class KnownRewardsJudge:
    """Three groups of 4: the first all equal (zero variance, skipped), the others four distinct known rewards."""

    COLUMNS = ([0.5] * 4 + [0.2, 0.4, 0.6, 0.8] + [0.9, 0.7, 0.3, 0.1],
               [0.5] * 4 + [0.9, 0.3, 0.7, 0.1] + [0.2, 0.2, 0.8, 0.6],
               [0.5] * 4 + [0.1, 0.2, 0.3, 0.4] + [0.5, 0.1, 0.0, 0.3],
               [1.0] * 4 + [1.0, 0.5, 1.0, 0.5] + [0.6, 1.0, 1.0, 0.8])

    def score(self, samples):
        assert len(samples) == 12
        return RewardBreakdown(*(torch.tensor(c) for c in self.COLUMNS))


def _known_rewards_step(tmp_path, **kw):
    """One step on `KnownRewardsJudge`'s rewards; returns the trainer, its metrics and the gradient it applied.
    The tiny model's <begin_of_image> logit points along its mean hidden state, so that some chains end early."""
    bundle = build_preset("tiny", image_size=64)
    with torch.no_grad():
        ids = torch.tensor(bundle.encode_prompts(PROMPTS[:1], 3))
        h = bundle.model.model.language_model(input_ids=ids).last_hidden_state[0].mean(0)
        bundle.model.get_output_embeddings().weight[bundle.boi_id] = h * (6 / h.dot(h))
    config = small_config(tmp_path, prompts_per_step=3, max_grad_norm=1e9, **kw)
    trainer = GRPOTrainer(config, bundle, PROMPTS, KnownRewardsJudge())
    grads = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        [p.grad.clone() for p in trainer.params if p.grad is not None]))
    return trainer, trainer.train_step(), grads[0]


@pytest.mark.parametrize("loss_type, accumulation", [("dapo", 1), ("dr_grpo", 3), ("grpo", 3)])
def test_step_loss_is_trls_from_the_weighted_rewards(tmp_path, loss_type, accumulation):
    """The logged loss of an on-policy step (ratio 1, beta 0: each token's loss is -A) against a hand computation
    of TRL's definitions: rewards R_PI*(R_sem+R_spa)*R_RI of the weighted components, A = (r - mean) / (unbiased std
    + 1e-4) per group, the zero-variance group left out, a forced <begin_of_image> not trained; `dapo` divides by
    the step's trained tokens, `dr_grpo` by B x (max_reasoning_tokens + 1 + image tokens), `grpo` averages the
    sequences' token means. With accumulation 3 the 8 kept samples split 3/3/2: every sequence still weighs the
    same, as in one batch (the same loss and gradient as without accumulation)."""
    weights = [2.0, 1.0, 3.0, 0.5]
    trainer, metrics, grads = _known_rewards_step(tmp_path / "a", reward_weights=weights, loss_type=loss_type,
                                                  gradient_accumulation_steps=accumulation)
    a, b, c, d = (torch.tensor(col, dtype=torch.float64) * w for col, w in zip(KnownRewardsJudge.COLUMNS, weights))
    rewards = a * (b + c) * d
    assert metrics["reward/mean"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert (metrics["groups/zero_variance"], metrics["groups/trained"]) == (1, 2)
    r = rewards[4:].view(2, 4)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    samples = [s for g in trainer._last_groups[1:] for s in g.samples]
    assert any(s.boi_forced for s in samples) and not all(s.boi_forced for s in samples)  # both kinds counted
    assert len({len(s.reasoning_ids) for s in samples}) > 1  # sequences of several lengths
    tokens = torch.tensor([len(s.reasoning_ids) - s.boi_forced + len(s.image_tokens) for s in samples],
                          dtype=torch.float64)
    if loss_type == "grpo":
        expected = -adv.mean()
    else:
        denom = tokens.sum() if loss_type == "dapo" else 8 * (3 + 1 + len(samples[0].image_tokens))
        expected = -(adv * tokens).sum() / denom
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    if accumulation > 1:
        _, _, one_batch = _known_rewards_step(tmp_path / "b", reward_weights=weights, loss_type=loss_type)
        for g, g1 in zip(grads, one_batch, strict=True):
            torch.testing.assert_close(g, g1, rtol=1e-4, atol=1e-7)


def _grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def test_accumulation_and_iterations_follow_trl(tmp_path, monkeypatch):
    """TRL's num_iterations: pass one is on-policy (old log-probs None), pass two reuses pass one's log-probs of
    the same micro-batch (from before the update). Gradient accumulation changes neither the update nor any logged
    metric (`grpo` averages per sequence). The gradient the optimizer applies is clipped to max_grad_norm, the
    logged grad_norm is the mean of the passes' norms before clipping, and the cosine schedule runs over
    max_steps x num_iterations optimizer steps."""
    calls = _spy_objective(monkeypatch)
    clip_norms, real_clip = [], torch.nn.utils.clip_grad_norm_

    def clip(*args, **kwargs):  # the norm before clipping, as torch returns it
        clip_norms.append(real_clip(*args, **kwargs))
        return clip_norms[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    runs = {}
    for ga in (2, 1):
        calls.clear()
        clip_norms.clear()
        trainer = make_trainer(tmp_path / str(ga), loss_type="grpo", num_iterations=2, gradient_accumulation_steps=ga,
                               max_grad_norm=0.01, lr_scheduler_type="cosine", max_steps=2, save_steps=100)
        applied = []
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, params=trainer.params, out=applied: out.append(_grad_norm(params)))
        [metrics] = trainer.train(max_steps=1)
        runs[ga] = trainer, metrics
        assert len(calls) == 2 * ga and all(c["old"] is None for c in calls[:ga])
        for first, second in zip(calls[:ga], calls[ga:]):
            assert all(torch.equal(o, lp) for o, lp in zip(second["old"], first["logp"]))
            assert not torch.equal(second["logp"][1], first["logp"][1])  # the policy moved in between
        norms = [float(n) for n in clip_norms]
        assert len(applied) == 2 and min(norms) > 0.01 and max(applied) <= 0.01 * (1 + 1e-4)
        assert metrics["grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-6)
        assert metrics["lr"] == pytest.approx(2e-2 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
        ratios = []  # each pass's token mean of exp(logp - old) over both heads (pass one: exactly 1)
        for call in calls:
            mask = call["batch"].reasoning_mask
            (lt, li), (ot, oi) = call["logp"], call["old"] or call["logp"]
            ratio_sum = ((lt - ot).exp() * mask).sum() + (li - oi).exp().sum()
            ratios.append(float(ratio_sum) / float(mask.sum() + li.numel()))
        if ga == 1:  # metrics average over the passes
            assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / 2, rel=1e-5)
            assert ratios[0] == 1.0 and abs(ratios[1] - 1) > 1e-4
    (a, ma), (b, mb) = runs[2], runs[1]
    for key in ("loss", "ratio_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "grad_norm", "advantage/std",
                "parity/logprob_diff_max"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-6), key
    for (n1, p1), (n2, p2) in zip(a.bundle.model.named_parameters(), b.bundle.model.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6, msg=n1)


def test_steps_draw_with_fresh_seeds_in_the_seeded_prompt_order(tmp_path):
    """Every request of every step has its own rollout seed (the same prompt at the same place in two steps must
    not draw the same samples), and the prompts come in `config.seed`'s shuffled order, reshuffled each epoch."""
    import random

    trainer = make_trainer(tmp_path, judge=ConstantJudge(), seed=5, max_steps=3, save_steps=100)
    seeds, prompts, real = [], [], trainer.engine.generate

    def generate(step_prompts, params, **kwargs):
        seeds.extend(sp.seed for sp in params)
        prompts.append(step_prompts)
        return real(step_prompts, params, **kwargs)

    trainer.engine.generate = generate
    trainer.train()
    assert len(seeds) == 6 and len(set(seeds)) == 6
    orders = []
    for epoch in (0, 1):
        order = list(range(len(PROMPTS)))
        random.Random(5 + epoch).shuffle(order)
        orders.append([PROMPTS[i] for i in order])
    assert orders[0] != orders[1]
    assert prompts == [orders[0][:2], orders[0][2:], orders[1][:2]]


def test_checkpoints_at_save_steps_and_the_end_metrics_every_logging_steps(tmp_path):
    trainer = make_trainer(tmp_path, judge=ConstantJudge(), max_steps=3, save_steps=2, logging_steps=2)
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-3"
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]


# ------------------------------------------------------------------------------------------------ fp16 loss scaling
def fp16_trainer(tmp_path, **kw) -> GRPOTrainer:
    """The tiny preset in fp16, LoRA adapters fp32 (peft's); the frozen VQ decoder, which only turns rollouts into
    images, in fp32: CPU fp16 convolutions are ~50x slower and no gradient passes through it."""
    bundle = build_preset("tiny", image_size=64, dtype=torch.float16)
    bundle.model.model.vqmodel.float()
    return GRPOTrainer(small_config(tmp_path, dtype="float16", **kw), bundle, PROMPTS, CodebookSubsetJudge(512))


def test_fp16_step_scales_the_fused_loss_and_skips_a_step_with_inf_gradients(tmp_path, monkeypatch,
                                                                             poison_first_step):
    """The loss scaler's scale reaches the fused loss (`grad_scale`) of every micro-batch; a step with inf gradients
    is skipped as in transformers' Trainer (parameters, optimizer state and the learning rate schedule untouched, the
    scale halved); the next trains at the halved scale; metrics.jsonl logs both."""
    import gotr1.objective

    scales, real = [], gotr1.objective.grpo_objective
    monkeypatch.setattr(gotr1.objective, "grpo_objective",
                        lambda *a, **kw: (scales.append(kw["grad_scale"]), real(*a, **kw))[1])
    trainer = fp16_trainer(tmp_path, max_steps=2, save_steps=100, gradient_accumulation_steps=2,
                           lr_scheduler_type="linear")
    poison_first_step(trainer)
    before = [p.detach().clone() for p in trainer.params]
    [first] = trainer.train(max_steps=1)
    assert scales == [2.0**16] * 2 and (first["loss_scale"], first["step_skipped"]) == (2.0**16, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and not trainer.optimizer.state
    assert trainer.loss_scaler.scale == 2.0**15 and trainer.scheduler.last_epoch == 0 and first["lr"] == 2e-2
    second = trainer.train()[-1]
    assert scales[2:] == [2.0**15] * 2 and (second["loss_scale"], second["step_skipped"]) == (2.0**15, 0.0)
    assert math.isfinite(second["grad_norm"]) and second["lr"] == pytest.approx(1e-2)
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["loss_scale"], m["step_skipped"]) for m in logged] == [(2.0**16, 1.0), (2.0**15, 0.0)]


def test_fp16_resume_is_exact(tmp_path, poison_first_step):
    """The checkpoint holds the halved scale of a skipped first step: the resumed fp16 run gives the uninterrupted
    run's metrics (loss scales and skips included) and parameters."""
    full = fp16_trainer(tmp_path / "full")
    poison_first_step(full)
    full_history = full.train()
    part = fp16_trainer(tmp_path / "part")
    poison_first_step(part)
    part.train(max_steps=2)
    resumed = fp16_trainer(tmp_path / "part")
    resumed.resume(tmp_path / "part")
    assert resumed.loss_scaler.scale == part.loss_scaler.scale < 2.0**16
    resumed_history = resumed.train()

    def rows(history):  # as JSON, where a skipped step's NaN grad_norm equals itself
        return [json.dumps({k: v for k, v in h.items() if not k.startswith(("time/", "tokens_per_s/"))},
                           sort_keys=True) for h in history]

    assert rows(resumed_history) == rows(full_history) and full_history[0]["step_skipped"] == 1.0
    for (n1, p1), (n2, p2) in zip(full.bundle.model.named_parameters(), resumed.bundle.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
