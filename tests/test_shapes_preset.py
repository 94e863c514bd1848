"""The shapes preset end to end: the shipped SFT checkpoint, `gotr1 eval` and `--preset shapes` sft/train/generate."""
import json

import pytest
import torch

from bench.shapes import summarise
from gotr1.cli import main
from gotr1.config import EvalConfig
from gotr1.model import load_model
from gotr1.shapes.evaluate import evaluate, format_table
from gotr1.shapes.preset import (
    SFT_COMMAND,
    SFT_PATH,
    load_shapes,
    save_sft_weights,
    sft_info,
    split_prompts,
)
from gotr1.shapes.world import CATEGORIES, PromptParseError, parse_prompt

PROMPTS = ["a red square left of a blue circle", "two green triangles", "a yellow circle above a purple square"]


@pytest.fixture(scope="module")
def shapes():
    return load_model("shapes")


def test_shipped_checkpoint_is_small_and_records_how_it_was_made():
    assert SFT_PATH.is_file(), f"rebuild with {SFT_COMMAND}"
    assert SFT_PATH.stat().st_size + (SFT_PATH.parent / "vq.safetensors").stat().st_size < 25 * 2**20
    info = sft_info()
    assert info["command"].startswith("gotr1 sft --preset shapes")
    assert info["steps"] > 0 and info["train_seconds"] > 0


def test_weights_round_trip_and_a_missing_file_names_the_rebuild_command(shapes, tmp_path):
    path = save_sft_weights(shapes, tmp_path / "w.safetensors", {"steps": 7})
    assert sft_info(path) == {"steps": 7}
    again = load_shapes(path=path)
    for (k, a), b in zip(shapes.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    base = load_shapes(trained=False)
    assert not torch.equal(base.model.get_output_embeddings().weight, shapes.model.get_output_embeddings().weight)
    with pytest.raises(FileNotFoundError, match="gotr1 sft --preset shapes"):
        load_shapes(path=tmp_path / "absent.safetensors")


def test_splits_are_disjoint_and_cover_every_category():
    train, val = split_prompts("train"), split_prompts("val")
    assert len(val) == 200 and not set(train) & set(val)
    assert {parse_prompt(p).category for p in val} == set(CATEGORIES)
    with pytest.raises(ValueError, match="split"):
        split_prompts("test")


def test_sft_checkpoint_plans_and_draws_held_out_prompts(shapes):
    """Greedy, the shipped model names the right objects, places them as asked and draws most of them where it
    planned (measured at shipping: R_sem 1.0, R_spa 0.92, R_PI 0.57, R_RI 0.54 on these 20 prompts)."""
    result = evaluate(shapes, split_prompts("val")[::10], EvalConfig(n=1, text_temperature=0, image_temperature=0),
                      progress=False)
    overall = result.summary["overall"]
    assert overall["n"] == 20
    assert overall["R_sem"] > 0.95 and overall["R_spa"] > 0.85
    assert overall["R_PI"] > 0.45 and overall["R_RI"] > 0.45 and overall["accuracy"] >= 0.2


def test_evaluate_rejects_prompts_outside_the_grammar_before_generating(shapes):
    with pytest.raises(PromptParseError):
        evaluate(shapes, ["a red square", "a dog on a sofa"], EvalConfig(n=1))
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(shapes, [], EvalConfig(n=1))


def test_format_table_shows_each_label_and_the_relative_change():
    row = {"total": 0.5, "accuracy": 0.25, "R_PI": 1.0, "R_sem": 0.5, "R_spa": 0.5, "R_RI": 0.5, "n": 4}
    better = {**row, "total": 0.75}
    table = format_table({"SFT": {"spatial": row, "overall": row}, "GRPO": {"spatial": better, "overall": better}})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["category", "n", "total", "SFT"]
    spatial = next(line for line in lines if line.startswith("spatial")).split()
    assert spatial[1] == "4" and spatial[2:4] == ["0.500", "0.750"] and spatial[-1] == "+50.0%"


def test_cli_eval_writes_per_category_json(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["eval", "--preset", "shapes", "--prompts", str(prompts), "--n", "2", "--json",
                 str(tmp_path / "e.json"), "--out", str(tmp_path / "img")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert len(out["samples"]) == 6 and out["settings"]["n"] == 2
    assert out["summary"]["overall"]["n"] == 6
    assert {s["category"] for s in out["samples"]} == {parse_prompt(p).category for p in PROMPTS}
    assert abs(out["summary"]["overall"]["total"] - sum(s["total"] for s in out["samples"]) / 6) < 1e-6
    assert (tmp_path / "img" / "p000_s00_layout.png").is_file()
    assert "overall" in capsys.readouterr().out


def test_cli_eval_reports_prompts_outside_the_grammar(tmp_path, capsys):
    assert main(["eval", "--preset", "shapes", "--prompt", "a cat playing piano"]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_generate_shapes_defaults_to_cfg_one(tmp_path):
    assert main(["generate", "--preset", "shapes", "--prompt", PROMPTS[0], "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert record["objects"] and (tmp_path / record["layout"]).is_file()


def test_cli_sft_preset_shapes_writes_a_loadable_compact_checkpoint(tmp_path, monkeypatch):
    """The rebuild command's path, shortened: world data (fewer scenes), the untrained base, a *.safetensors
    export."""
    monkeypatch.setattr("gotr1.shapes.preset.SFT_SCENES", 50)
    out = tmp_path / "sft.safetensors"
    assert main(["sft", "--preset", "shapes", "--max-steps", "2", "--per-device-train-batch-size", "4",
                 "--output-dir", str(tmp_path / "run"), "--export", str(out)]) == 0
    info = sft_info(out)
    assert info["steps"] == 2 and info["examples"] == 50
    assert info["command"].startswith("gotr1 sft --preset shapes --max-steps 2 ")
    bundle = load_shapes(path=out)
    base = load_shapes(trained=False)
    assert not torch.equal(bundle.model.get_output_embeddings().weight, base.model.get_output_embeddings().weight)


def test_cli_train_preset_shapes_evaluates_before_and_after(tmp_path, capsys):
    """The README's main job, shortened: GRPO from the shipped checkpoint between two held-out evaluations."""
    held_out = tmp_path / "val.txt"
    held_out.write_text("\n".join(split_prompts("val")[::40]) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--preset", "shapes", "--max-steps", "2", "--num-generations", "4",
                 "--prompts-per-step", "2", "--eval-prompts", str(held_out), "--eval-n", "1",
                 "--output-dir", str(run)]) == 0
    table = (run / "eval_table.txt").read_text()
    assert "total step 0" in table and "total step 2" in table and "overall" in table
    report = json.loads((run / "eval.json").read_text())
    assert set(report) == {"step 0", "step 2"}
    assert all(len(r["samples"]) == 5 for r in report.values())
    assert (run / "reward_curves.png").is_file() and (run / "checkpoint-2").is_dir()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert "total change" in capsys.readouterr().out
    metrics, rows = summarise(run)  # what `python -m bench shapes` records of such a run
    before, after = report["step 0"]["summary"]["overall"], report["step 2"]["summary"]["overall"]
    assert metrics["steps"] == 2 and metrics["before"]["overall"] == before and metrics["after"]["overall"] == after
    assert metrics["total_change"]["overall"] == pytest.approx(after["total"] / before["total"] - 1)
    assert len(metrics["train_reward_mean_per_50_steps"]) == 1 and rows[-1]["category"] == "overall"


# ------------------------------------------------------------------------------------------- mutation review
def test_sft_weights_leave_the_vq_to_its_own_asset(shapes, tmp_path):
    from safetensors import safe_open

    path = save_sft_weights(shapes, tmp_path / "w.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert "model.vqmodel.quantize.embedding.weight" in shapes.model.state_dict()
    assert keys and not [k for k in keys if k.startswith("model.vqmodel.")]
