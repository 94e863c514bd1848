"""gotr1/checkpoint.py without a trainer: atomic publishing, resolving, RNG and metrics restore, strict loading."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


class _Tiny(nn.Module):
    """A model with peft's `save_pretrained` shape: full weights as safetensors."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def save_pretrained(self, directory):
        from safetensors.torch import save_file

        save_file(self.state_dict(), Path(directory) / "model.safetensors")


def _save(tmp_path, step, **extra):
    from gotr1.checkpoint import save_checkpoint

    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(tmp_path, step, model, opt, sched, extra)


def test_checkpoint_is_renamed_into_place_before_latest_names_it(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(Path(b).name), real_replace(a, b))[1])
    _save(tmp_path, 3)
    assert events == ["checkpoint-3", "latest"]


def test_a_stale_temporary_directory_is_not_published(tmp_path):
    stale = tmp_path / ".checkpoint-3.tmp"
    stale.mkdir(parents=True)
    (stale / "junk.safetensors").write_text("from a crashed save")
    final = _save(tmp_path, 3)
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "trainer_state.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "latest"]


def test_resolve_checkpoint_refuses_what_it_cannot_resume(tmp_path):
    from gotr1.checkpoint import resolve_checkpoint

    final = _save(tmp_path, 2)
    assert resolve_checkpoint(tmp_path) == final and resolve_checkpoint(final) == final
    (tmp_path / "latest").write_text("checkpoint-9\n")  # names a checkpoint that never completed
    with pytest.raises(FileNotFoundError, match="holds no trainer_state.pt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_rng_state_round_trip_restores_every_generator():
    from gotr1.checkpoint import rng_state, set_rng_state

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    state = rng_state()
    first = draw()
    draw()
    set_rng_state(state)
    assert draw() == first


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    from gotr1.checkpoint import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_loading_weights_this_model_has_no_place_for_raises(tmp_path):
    from safetensors.torch import save_file

    from gotr1.checkpoint import load_adapter_weights

    save_file({"other.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected weights"):
        load_adapter_weights(_Tiny(), tmp_path)


def test_a_lora_adapter_of_other_target_modules_raises(tmp_path):
    from peft import LoraConfig, get_peft_model

    from gotr1.checkpoint import load_adapter_weights

    def model(target):
        return get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), LoraConfig(r=2, target_modules=[target]))

    model("0").save_pretrained(tmp_path)
    load_adapter_weights(model("0"), tmp_path)
    with pytest.raises(ValueError, match="no place for"):
        load_adapter_weights(model("1"), tmp_path)


def test_resume_refuses_a_checkpoint_of_another_trainer(tmp_path):
    from gotr1.checkpoint import Checkpointed

    _save(tmp_path, 1, trainer="SFTTrainer")

    class GRPOTrainer(Checkpointed):
        pass

    with pytest.raises(ValueError, match="written by SFTTrainer, not GRPOTrainer"):
        GRPOTrainer().resume(tmp_path)


def test_the_loss_scaler_state_round_trips_and_its_absence_leaves_it_fresh(tmp_path):
    """The fp16 scaler's state (scale, growth tracker) is saved beside the optimizer's and restored; a checkpoint
    without one (older, or of a bf16/fp32 run, whose disabled scaler saves {}) leaves the scaler at its initial
    state, and a disabled scaler ignores a saved one."""
    from gotr1.checkpoint import load_state, save_checkpoint
    from gotr1.training import LossScaler

    def scaler(dtype):
        model = _Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, LossScaler(opt, list(model.parameters()), dtype)

    model, opt, fp16 = scaler("float16")
    fp16.backward(model.lin(torch.full((1, 2), float("inf"))).sum())
    assert fp16.step(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0)["step_skipped"] == 1.0
    fp16.backward(model.lin(torch.ones(1, 2)).sum())
    fp16.step(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0)
    saved = fp16.state_dict()
    assert (saved["scale"], saved["_growth_tracker"]) == (2.0**15, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert load_state(save_checkpoint(tmp_path / "a", 1, model, opt, sched, {}, scaler=fp16))["scaler"] == saved
    assert "scaler" not in load_state(save_checkpoint(tmp_path / "b", 1, model, opt, sched, {}))
    _, _, fresh = scaler("float16")
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    for old in (None, {}):
        _, _, fresh = scaler("float16")
        fresh.load_state_dict(old)
        assert fresh.state_dict() == {"scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5,
                                      "growth_interval": 2000, "_growth_tracker": 0}
    _, _, bf16 = scaler("bfloat16")
    bf16.load_state_dict(saved)
    assert not bf16.enabled and bf16.scale == 1.0 and bf16.state_dict() == {}
