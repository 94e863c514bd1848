import json

import pytest
import torch

from gotr1.chain import GOT_TAGS
from gotr1.model import build_preset, check_model_dir, load_model, save_bundle


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", image_size=64)


def test_tiny_preset_is_seeded_and_has_got_tags(tiny):
    again = build_preset("tiny", image_size=64)
    for (n1, p1), (n2, p2) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    other = build_preset("tiny", image_size=64, seed=1)
    assert not torch.equal(other.model.lm_head.weight, tiny.model.lm_head.weight)
    for tag, tid in zip(GOT_TAGS, tiny.got_tag_ids):
        assert tiny.tokenizer.convert_tokens_to_ids(tag) == tid
        assert tiny.tokenizer(tag, add_special_tokens=False)["input_ids"] == [tid]
    assert tiny.num_image_tokens == 16
    assert build_preset("tiny").num_image_tokens == 576


def test_encode_prompts_checks_input(tiny):
    ids = tiny.encode_prompts(["a red circle"], max_reasoning_tokens=10)[0]
    assert ids[0] == tiny.bos_id and "a red circle" in tiny.tokenizer.decode(ids)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny.encode_prompts(["ok", "  "], 10)
    with pytest.raises(ValueError, match="no prompts"):
        tiny.encode_prompts([], 10)
    with pytest.raises(ValueError, match="too long"):
        tiny.encode_prompts(["word " * 500], 600)
    for special in ("<begin_of_image>", tiny.tokenizer.bos_token):  # would be read as the token itself
        assert tiny.tokenizer(f"a {special}")["input_ids"].count(tiny.tokenizer.convert_tokens_to_ids(special)) >= 1
        with pytest.raises(ValueError, match=f"prompt 0 contains the special token '{special}'"):
            tiny.encode_prompts([f"a cat {special} left of a dog"], 10)


def test_decode_images_gives_rgb_of_model_size(tiny):
    images = tiny.decode_images(torch.randint(0, 1024, (3, 16)))
    assert len(images) == 3 and images[0].size == (64, 64) and images[0].mode == "RGB"


def test_save_and_load_round_trip(tiny, tmp_path):
    save_bundle(tiny, tmp_path)
    loaded = load_model(model_dir=tmp_path)
    ids = torch.tensor(tiny.encode_prompts(["two cats"], 10))
    assert torch.equal(loaded.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)
    assert (loaded.bos_id, loaded.pad_id, loaded.boi_id, loaded.got_tag_ids) == (
        tiny.bos_id, tiny.pad_id, tiny.boi_id, tiny.got_tag_ids)


def test_loader_errors_name_the_problem(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(model_dir=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_dir(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_model_dir(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="expected 'janus'"):
        check_model_dir(empty)
    full = tmp_path / "full"
    save_bundle(tiny, full)
    (full / "model.safetensors").rename(full / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights"):
        check_model_dir(full)
    (full / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing weight shards shard-1.safetensors"):
        check_model_dir(full)
    (full / "model.safetensors.index.json").unlink()
    (full / "moved.safetensors").rename(full / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (full / f).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        check_model_dir(full)
    with pytest.raises(ValueError, match="exactly one"):
        load_model()
    with pytest.raises(ValueError, match="unknown preset"):
        load_model("huge")


def test_transformers_does_not_take_our_kernels_for_the_kernel_hub():
    from transformers.utils import import_utils

    import kernels  # ours: the top-level package of this repo

    assert kernels.__file__.endswith("kernels/__init__.py")
    assert not import_utils.is_kernels_available()


def test_loader_names_corrupt_or_incomplete_files(tiny, tmp_path):
    """A truncated weight file, a broken shard index or a tokenizer without its config (Janus's image tokens live
    there) is reported with the file at fault, not as a bare parser error from deep inside transformers."""
    import shutil

    good = tmp_path / "good"
    save_bundle(tiny, good)

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(good, d)
        change(d)
        return d

    d = broken("truncated", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"))
    with pytest.raises(ValueError, match="corrupt"):
        load_model(model_dir=d)
    d = broken("index", lambda d: (d / "model.safetensors.index.json").write_text("{oops"))
    with pytest.raises(ValueError, match="model.safetensors.index.json is not valid JSON"):
        load_model(model_dir=d)
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors.index.json has no weight_map"):
        load_model(model_dir=d)
    d = broken("tokenizer", lambda d: (d / "tokenizer_config.json").unlink())
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_model(model_dir=d)
