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
