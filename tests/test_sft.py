import json

import pytest
import torch
from PIL import Image

from gotr1.config import SFTConfig
from gotr1.model import build_preset, encode_images, load_model
from gotr1.sft import SFTExample, SFTTrainer, read_sft_jsonl


def _examples(bundle, n=6):
    g = torch.Generator().manual_seed(0)
    chains = [f"a thing <|obj_start|>red circle<|obj_end|> <|box_start|>({10 * i},20),(300,400)<|box_end|>"
              for i in range(n)]
    return [SFTExample(f"prompt {i}", c, torch.randint(0, 64, (bundle.num_image_tokens,), generator=g))
            for i, c in enumerate(chains)]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), learning_rate=3e-3, max_steps=6, per_device_train_batch_size=3,
                use_lora=False, save_steps=3, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def test_sft_lowers_loss_and_exports_a_loadable_model(tmp_path):
    bundle = build_preset("tiny", image_size=64)
    trainer = SFTTrainer(_config(tmp_path, max_steps=12), bundle, _examples(bundle))
    history = trainer.train()
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert sum(p.numel() for p in trainer.params) > 0
    assert not any(p.requires_grad for p in bundle.model.model.vqmodel.parameters())
    trainer.export(tmp_path / "final")
    loaded = load_model(model_dir=tmp_path / "final")
    ids = torch.tensor(bundle.encode_prompts(["x"], 1))
    assert torch.equal(loaded.model(input_ids=ids).logits, bundle.model(input_ids=ids).logits)
    assert (tmp_path / "loss_curves.png").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {"loss", "loss/text", "loss/image", "grad_norm"} <= set(json.loads(lines[0]))


def test_sft_resume_is_exact(tmp_path):
    full_bundle = build_preset("tiny", image_size=64)
    full = SFTTrainer(_config(tmp_path / "full", use_lora=True, lora_r=4, lora_alpha=8), full_bundle,
                      _examples(full_bundle))
    full.train()
    part_bundle = build_preset("tiny", image_size=64)
    part = SFTTrainer(_config(tmp_path / "part", use_lora=True, lora_r=4, lora_alpha=8), part_bundle,
                      _examples(part_bundle))
    part.train(max_steps=3)
    resumed_bundle = build_preset("tiny", image_size=64)
    resumed = SFTTrainer(_config(tmp_path / "part", use_lora=True, lora_r=4, lora_alpha=8), resumed_bundle,
                         _examples(resumed_bundle))
    resumed.resume(tmp_path / "part")
    assert resumed.step == 3
    resumed.train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (n1, p1), (n2, p2) in zip(full_bundle.model.named_parameters(), resumed_bundle.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # peft alone can load the adapter
    from peft import PeftModel
    PeftModel.from_pretrained(build_preset("tiny", image_size=64).model, tmp_path / "part" / "checkpoint-6")


def test_sft_jsonl_reader_encodes_images_and_reports_errors(tmp_path):
    bundle = build_preset("tiny", image_size=64)
    Image.new("RGB", (100, 80), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "red", "chain": "c", "image": "a.png"}) + "\n")
    [ex] = read_sft_jsonl(tmp_path / "data.jsonl", bundle)
    assert ex.image_tokens.shape == (16,)
    assert torch.equal(ex.image_tokens, encode_images(bundle.model.model.vqmodel, [Image.open(tmp_path / "a.png")])[0])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "red", "image": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="missing string fields"):
        read_sft_jsonl(tmp_path / "bad.jsonl", bundle)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "red", "chain": "c", "image": "no.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match="no.png"):
        read_sft_jsonl(tmp_path / "bad.jsonl", bundle)
    with pytest.raises(FileNotFoundError):
        read_sft_jsonl(tmp_path / "missing.jsonl", bundle)
