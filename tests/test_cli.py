import json

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
                           (["--num-kv-blocks", "0"], "num_kv_blocks must be a positive int")]:
        assert main(["serve", "--preset", "tiny", *flags]) == 2
        assert message in capsys.readouterr().err
