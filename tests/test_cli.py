import json

import pytest

from gotr1.cli import main


def test_generate_writes_image_chain_and_layout(tmp_path):
    rc = main(["generate", "--preset", "tiny", "--prompt", "a red circle", "-n", "2", "--seed", "1",
               "--max-reasoning-tokens", "8", "--out", str(tmp_path)])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["prompt"] == "a red circle"
        assert (tmp_path / r["image"]).stat().st_size > 0 and (tmp_path / r["layout"]).stat().st_size > 0
    assert (tmp_path / "p000_s01_chain.txt").read_text().strip() == records[1]["reasoning"].strip()



def test_generating_again_into_a_folder_leaves_only_the_new_samples(tmp_path):
    """A smaller second run must not leave the first run's files beside its own."""
    (tmp_path / "notes.txt").write_text("mine")
    args = ["generate", "--preset", "tiny", "--prompt", "a red circle", "--seed", "1", "--max-reasoning-tokens",
            "4", "--out", str(tmp_path)]
    assert main([*args, "-n", "3"]) == 0
    assert main([*args, "-n", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "p000_s00.png", "p000_s00_chain.txt",
                                                           "p000_s00_layout.png", "samples.jsonl"]



@pytest.mark.parametrize("command, flag, shown", [
    ("train", "--learning-rate", "(default: 1e-05; --preset shapes: 0.0002)"),
    ("train", "--lr-scheduler-type", "(default: cosine; --preset shapes: constant)"),
    ("sft", "--max-steps", "(default: 1000; --preset shapes: 3000)"),
])
def test_training_help_names_the_shapes_presets_values(command, flag, shown, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{flag} {flag.removeprefix('--').upper().replace('-', '_')}, --{flag[2:].replace('-', '_')} " \
           f"{flag.removeprefix('--').upper().replace('-', '_')} {shown}" in help_text


def test_generate_reports_bad_model_dir(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_refuses_an_out_path_that_is_a_file_before_generating(tmp_path, capsys, monkeypatch):
    import gotr1.cli

    out = tmp_path / "taken"
    out.write_text("x")
    monkeypatch.setattr(gotr1.cli, "load_from_args", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["generate", "--preset", "tiny", "--prompt", "x", "--out", str(out)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_bad_yaml_config_is_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [unclosed\n")
    assert main(["train", "--preset", "tiny", "--prompt", "a", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.yaml" in err and "line 1" in err


def test_an_os_error_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    """E.g. an output path in a read-only or full file system, a directory where a file is written."""
    import gotr1.cli

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(gotr1.cli, "cmd_generate", denied)
    assert main(["generate", "--preset", "tiny", "--prompt", "x"]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_serve_checks_its_flags_before_loading_the_model(capsys, monkeypatch):
    """A bad port crashed in uvicorn's bind with a traceback, and bad limits were reported only after the model
    (minutes for a 7B) had loaded."""
    import gotr1.cli

    monkeypatch.setattr(gotr1.cli, "load_from_args", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    for flags, message in [(["--port", "99999"], "port must be in 0..65535"), (["--port", "-1"], "port must be"),
                           (["--max-n", "0"], "max_n must be a positive int"),
                           (["--max-body-bytes", "0"], "max_body_bytes must be a positive int"),
                           (["--num-kv-blocks", "0"], "num_kv_blocks must be a positive int"),
                           (["--num-image-scheduler-steps", "0"], "num_image_scheduler_steps must be None or")]:
        assert main(["serve", "--preset", "tiny", *flags]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", [False, True])
def test_serve_passes_the_engine_flags_on(monkeypatch, flag):
    import gotr1.cli
    import gotr1.serving

    seen = {}
    monkeypatch.setattr(gotr1.cli, "load_from_args", lambda *a: "bundle")
    monkeypatch.setattr(gotr1.serving, "serve", lambda bundle, **kw: seen.update(kw))
    argv = ["serve", "--preset", "tiny", "--num-image-scheduler-steps", "7",
            *(["--disable-cascade-attn", "--enable-pdl"] * flag)]
    assert main(argv) == 0
    config = seen["engine_config"]
    # None: the device's default
    assert config.num_image_scheduler_steps == 7 and config.disable_cascade_attn is (flag or None)
    assert config.enable_pdl is flag


def _no_loading(monkeypatch):
    """Make loading a model or a judge fail the test: the checks under test must come before either."""
    import gotr1.cli
    import gotr1.rewards

    def loaded(*a, **k):
        raise AssertionError("loaded")

    monkeypatch.setattr(gotr1.cli, "load_from_args", loaded)
    monkeypatch.setattr(gotr1.rewards, "make_judge", loaded)


def test_bad_yaml_config_is_one_line_with_both_positions(tmp_path, capsys):
    """PyYAML's own message spans five lines (with a caret drawing); `error:` messages are one line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [unclosed\n")
    assert main(["sft", "--preset", "tiny", "--data", "x.jsonl", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert "\n" not in err
    assert err == (f"error: {bad} is not valid YAML: while parsing a flow sequence (line 1, column 16): "
                   "expected ',' or ']', but got '<stream end>' (line 2, column 1)")


def test_eval_refuses_a_json_path_that_is_a_directory_before_evaluating(tmp_path, capsys, monkeypatch):
    """It failed with `[Errno 21] Is a directory` only after every sample had been drawn and scored."""
    _no_loading(monkeypatch)
    assert main(["eval", "--preset", "shapes", "--prompt", "a red circle", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: output file {tmp_path} is a directory\n"


def test_a_resume_path_without_a_checkpoint_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """It was found only after the judge and the policy had loaded (minutes at 7B)."""
    _no_loading(monkeypatch)
    missing = tmp_path / "nothing"
    for command in (["train", "--preset", "tiny", "--prompt", "a"], ["sft", "--preset", "tiny", "--data", "x"]):
        assert main([*command, "--resume", str(missing)]) == 2
        assert capsys.readouterr().err.startswith(f"error: no checkpoint at {missing}: ")
    assert main(["train", "--preset", "tiny", "--prompt", "a", "--eval-n", "-1"]) == 2
    assert capsys.readouterr().err == "error: --eval-n must be >= 0, got -1\n"


def test_generate_checks_sampling_flags_before_loading_for_either_backend(capsys, monkeypatch):
    """The reference backend took `--top-p 2` silently and refused the shapes preset's CFG weight 1 only after
    the reasoning had been generated; the engine's checks ran after the model had loaded."""
    _no_loading(monkeypatch)
    cases = [(["--preset", "tiny", "--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
             (["--preset", "tiny", "--text-temperature", "-1"], "text_temperature must be 0 (greedy) or in"),
             (["--preset", "tiny", "-n", "0"], "n must be a positive int, got 0"),
             (["--preset", "shapes"], "--backend reference needs --cfg-weight > 1"),
             (["--preset", "tiny", "--cfg-weight", "1"], "--backend reference needs --cfg-weight > 1")]
    for flags, message in cases:
        for backend in (["reference"] if "cfg-weight" in message else ["engine", "reference"]):
            assert main(["generate", *flags, "--prompt", "a red circle", "--backend", backend]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err, (flags, backend, err)


class _RecordingEngine:
    """Stands in for `LLMEngine`: records each request's sampling settings, generates nothing."""

    requests: list = []

    def __init__(self, bundle, *a, **k):
        pass

    def generate(self, prompts, params, **k):
        _RecordingEngine.requests = list(params)
        return []


def test_generate_passes_seed_and_sampling_flags_to_the_engine(tmp_path, monkeypatch):
    """Prompt i of `--seed S` draws with seed S + i; the sampling flags reach every request; without
    `--cfg-weight` / `--max-reasoning-tokens` a non-shapes model samples with GoT-R1's CFG 5 and 600 tokens."""
    import engine

    monkeypatch.setattr(engine, "LLMEngine", _RecordingEngine)
    common = ["generate", "--preset", "tiny", "--prompt", "a", "--prompt", "b", "--out", str(tmp_path)]
    assert main([*common, "-n", "3", "--seed", "7", "--max-reasoning-tokens", "5", "--cfg-weight", "2.5",
                 "--text-temperature", "0.5", "--top-k", "9"]) == 0
    got = [(p.n, p.seed, p.max_reasoning_tokens, p.cfg_weight, p.text_temperature, p.top_k)
           for p in _RecordingEngine.requests]
    assert got == [(3, 7, 5, 2.5, 0.5, 9), (3, 8, 5, 2.5, 0.5, 9)]
    assert main(common) == 0
    assert [(p.seed, p.cfg_weight, p.max_reasoning_tokens) for p in _RecordingEngine.requests] == [(0, 5.0, 600),
                                                                                                  (1, 5.0, 600)]


def test_resume_flag_resumes_train_and_sft(tmp_path, monkeypatch):
    """`--resume DIR` puts the trainer at the checkpoint's step before training (train and sft alike)."""
    from PIL import Image

    from gotr1.grpo import GRPOTrainer
    from gotr1.sft import SFTTrainer

    started = []

    def fake_train(self, max_steps=None):  # the first run only writes a checkpoint at step 3
        started.append(self.step)
        if not (self.output_dir / "latest").exists():
            self.step = 3
            self.save()
        return self.history

    monkeypatch.setattr(GRPOTrainer, "train", fake_train)
    monkeypatch.setattr(SFTTrainer, "train", fake_train)
    run = tmp_path / "grpo"
    train = ["train", "--preset", "tiny", "--prompt", "a red circle", "--judge", "codebook:512", "--lora-r", "4",
             "--num-generations", "2", "--prompts-per-step", "1", "--output-dir", str(run)]
    assert main(train) == 0
    assert main([*train, "--resume", str(run)]) == 0
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text('{"prompt": "red", "chain": "c", "image": "a.png"}\n')
    run = tmp_path / "sft"
    sft = ["sft", "--preset", "tiny", "--data", str(tmp_path / "d.jsonl"), "--use-lora", "true", "--lora-r", "4",
           "--output-dir", str(run), "--export", str(tmp_path / "final")]
    assert main(sft) == 0
    assert main([*sft, "--resume", str(run)]) == 0
    assert started == [0, 3, 0, 3]


def test_eval_applies_the_adapter_and_its_flags(tmp_path, monkeypatch):
    """`eval --adapter DIR` merges the adapter before sampling, with the EvalConfig the flags build."""
    from types import SimpleNamespace

    import gotr1.cli
    import gotr1.model
    import gotr1.shapes.evaluate

    events = []
    bundle = SimpleNamespace(name="base")
    monkeypatch.setattr(gotr1.cli, "load_from_args", lambda args, dtype: bundle)
    monkeypatch.setattr(gotr1.model, "load_adapter", lambda b, path: events.append(("adapter", b, path)))
    row = {"total": 0.5, "accuracy": 0.25, "R_PI": 1.0, "R_sem": 0.5, "R_spa": 0.5, "R_RI": 0.5, "n": 1}

    def evaluate(b, prompts, config):
        events.append(("evaluate", b, prompts, (config.n, config.seed, config.cfg_weight)))
        return SimpleNamespace(summary={"overall": row}, to_json=dict, groups=[])

    monkeypatch.setattr(gotr1.shapes.evaluate, "evaluate", evaluate)
    assert main(["eval", "--preset", "shapes", "--prompt", "a red circle", "--adapter", str(tmp_path),
                 "--n", "3", "--seed", "4", "--cfg-weight", "2"]) == 0
    assert events == [("adapter", bundle, str(tmp_path)), ("evaluate", bundle, ["a red circle"], (3, 4, 2.0))]


def test_eval_prompts_are_the_eval_file_alone(tmp_path):
    """`train --prompt X --eval-prompts FILE`: X is a training prompt, never a held-out one."""
    import argparse

    from gotr1.cli import read_prompt_args

    (tmp_path / "val.txt").write_text("a blue square\n")
    args = argparse.Namespace(prompt=["a red circle"], prompts=None, eval_prompts=str(tmp_path / "val.txt"))
    assert read_prompt_args(args) == ["a red circle"]
    assert read_prompt_args(args, default_split="val", option="eval_prompts") == ["a blue square"]


def test_train_evaluates_with_its_own_sampling_settings_before_and_after(tmp_path, monkeypatch):
    """`train --preset shapes` evaluates the held-out prompts as it trains: every EvalConfig field but n is the
    training config's (temperatures, CFG, reasoning length, seed, reward combination), n is --eval-n."""
    import gotr1.cli
    import gotr1.grpo
    from gotr1.config import EvalConfig

    class Trainer:
        rank, step, engine = 0, 0, None

        def __init__(self, config, bundle, prompts, judge):
            pass

        def train(self):
            self.step = 2

    evaluated = []
    monkeypatch.setattr(gotr1.grpo, "GRPOTrainer", Trainer)
    monkeypatch.setattr(gotr1.cli, "load_from_args", lambda args, dtype: None)

    def evaluate(trainer, prompts, config, when):
        evaluated.append((when, trainer.step, prompts, config))
        return trainer.step, None

    monkeypatch.setattr(gotr1.cli, "_evaluate", evaluate)
    monkeypatch.setattr(gotr1.cli, "_report", lambda output_dir, results: None)
    (tmp_path / "val.txt").write_text("a red circle\n")
    assert main(["train", "--preset", "shapes", "--eval-prompts", str(tmp_path / "val.txt"), "--eval-n", "3",
                 "--text-temperature", "0.5", "--image-temperature", "0.8", "--cfg-weight", "2", "--seed", "9",
                 "--max-reasoning-tokens", "40", "--reward-combination", "sum", "--output-dir", str(tmp_path)]) == 0
    expected = EvalConfig(n=3, seed=9, text_temperature=0.5, image_temperature=0.8, cfg_weight=2.0,
                          max_reasoning_tokens=40, reward_combination="sum")
    assert evaluated == [("before", 0, ["a red circle"], expected), ("after", 2, ["a red circle"], expected)]


def test_evaluation_samples_in_eval_mode_and_restores_the_mode_it_found():
    """Dropout off while sampling; a model in eval mode (as `gotr1 eval` loads it) stays in eval mode, a training
    policy goes back to training (even when generation fails)."""
    from types import SimpleNamespace

    import torch

    from gotr1.shapes.evaluate import evaluate

    modes = []

    class Failing:
        def generate(self, prompts, params, use_tqdm=False):
            modes.append(bundle.model.training)
            raise RuntimeError("out of memory")

    for training in (False, True):
        bundle = SimpleNamespace(model=torch.nn.Linear(1, 1).train(training))
        with pytest.raises(RuntimeError, match="out of memory"):
            evaluate(bundle, ["a red circle"], engine=Failing(), progress=False)
        assert bundle.model.training is training
    assert modes == [False, False]
