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
                           (["--num-kv-blocks", "0"], "num_kv_blocks must be a positive int")]:
        assert main(["serve", "--preset", "tiny", *flags]) == 2
        assert message in capsys.readouterr().err


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
