import copy
import json
import re

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
    for tag in GOT_TAGS:  # ordinary added tokens, but a caption spelling one would plant a box in the prompt
        assert tiny.tokenizer.convert_tokens_to_ids(tag) in tiny.tokenizer(f"a {tag}")["input_ids"]
        with pytest.raises(ValueError, match=re.escape(f"prompt 0 contains the GoT tag '{tag}'")):
            tiny.encode_prompts([f"a cat {tag}(1,2),(3,4) left of a dog"], 10)


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


def test_tiny_preset_is_grouped_query_and_its_position_limit_is_exact(tiny):
    """The tiny preset has fewer KV heads than query heads (every engine test then covers GQA), and a prompt is
    refused exactly when prompt + reasoning + BOI + image tokens exceed the model's positions."""
    tc = tiny.model.config.text_config
    assert tc.num_key_value_heads < tc.num_attention_heads
    prompt = len(tiny.encode_prompts(["a red circle"], 0)[0])
    longest = tc.max_position_embeddings - prompt - 1 - tiny.num_image_tokens
    assert len(tiny.encode_prompts(["a red circle"], longest)[0]) == prompt
    with pytest.raises(ValueError, match="too long"):
        tiny.encode_prompts(["a red circle"], longest + 1)


def test_decode_images_equal_transformers_postprocess(tiny):
    """Decoded images are transformers' own `postprocess` of `decode_image_tokens` (channels-last, so rows are y):
    the same pixels up to the last bit (it truncates to uint8 where we round)."""
    import numpy as np

    tokens = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels = tiny.model.decode_image_tokens(tokens)  # [B, H, W, C]
    want = tiny.processor.postprocess(list(pixels.permute(0, 3, 1, 2).numpy()), return_tensors="PIL.Image.Image")
    for got, ref in zip(tiny.decode_images(tokens), want["pixel_values"], strict=True):
        diff = np.asarray(got).astype(int) - np.asarray(ref).astype(int)
        assert np.abs(diff).max() <= 1


# ------------------------------------------------------------------------------------------------------------------
# The engine's direct calls on the model's modules (engine.lean, engine.model_runner), where the tiny preset's
# defaults would hide a mistake: zero biases, Llama's eps, no LoRA bias, no global hooks.


def test_lean_keeps_the_biases_of_the_image_path(tiny):
    """The generation aligner and head have biases (zero at the preset's init, not in Janus-Pro's checkpoints):
    `lean`'s direct calls add them, to the bit of the modules' own forwards."""
    from engine.lean import lean

    janus = tiny.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module, width in ((janus.model.generation_aligner, janus.model.generation_embeddings.embedding_dim),
                              (janus.model.generation_head, janus.config.text_config.hidden_size)):
            module = copy.deepcopy(module)
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g))
            x = torch.randn(5, width, generator=g)
            assert torch.equal(lean(module)(x), module(x)), type(module).__name__


def test_lean_calls_modules_whose_call_is_not_their_forward():
    """An instance-level `forward` (accelerate's hooks, hub kernels) or a global forward hook changes what calling
    a module does: `lean` then returns the module itself, whose output carries the change."""
    from engine.lean import lean

    torch.manual_seed(0)
    linear, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    plain = lean(linear)
    assert plain is not linear
    linear.forward = lambda t: 2 * torch.nn.functional.linear(t, linear.weight, linear.bias)
    assert lean(linear) is linear
    del linear.forward
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: out + 1)
    try:
        assert lean(linear) is linear
        with torch.no_grad():
            torch.testing.assert_close(lean(linear)(x), plain(x) + 1)
    finally:
        handle.remove()
    assert lean(linear) is not linear


def test_lean_embedding_with_max_norm_renormalises_like_the_module():
    """`max_norm` renormalises the looked-up rows of the weight in place: such an embedding is called, and gives
    what the module gives."""
    from engine.lean import lean

    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, max_norm=1.0)
    with torch.no_grad():
        emb.weight.mul_(10)
    twin, ids = copy.deepcopy(emb), torch.tensor([1, 3, 3])
    with torch.no_grad():
        torch.testing.assert_close(lean(twin)(ids), emb(ids))


def test_stacked_re_homes_weights_of_one_storage_that_do_not_lie_back_to_back():
    """Parameters that share one storage but are not consecutive in it (a gap between them, or in the other order)
    cannot be one view: they are re-homed into a stack that holds their values."""
    from engine.lean import stacked

    big = torch.randn(9, 5)
    for first, second in ((slice(0, 3), slice(5, 7)), (slice(5, 7), slice(0, 5))):
        a, b = torch.nn.Parameter(big[first]), torch.nn.Parameter(big[second])
        want = torch.cat([a.detach(), b.detach()])
        stack = stacked([a, b])
        assert torch.equal(stack, want) and torch.equal(torch.cat([a.detach(), b.detach()]), want)


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_lora_with_a_bias_runs_as_peft_runs_it():
    """A LoRA adapter with a bias (`lora_bias=True`) is no plain `W + scaling * B A`: the engine leaves it to
    peft's forward (its merged or inline weights would drop the bias), so the engine's MLP equals peft's."""
    import dataclasses

    peft = pytest.importorskip("peft")
    from engine.config import EngineConfig
    from engine.lean import plain_lora
    from engine.llm_engine import LLMEngine

    bundle = build_preset("tiny", image_size=64, seed=3)
    pm = peft.get_peft_model(bundle.model, peft.LoraConfig(r=4, lora_bias=True,
                                                           target_modules=r".*layers\.0\.mlp\.gate_proj"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    mlp = pm.base_model.model.model.language_model.layers[0].mlp
    assert not plain_lora(mlp.gate_proj)
    for merge_lora in (True, False):
        eng = LLMEngine(dataclasses.replace(bundle, model=pm), EngineConfig(num_kv_blocks=8, merge_lora=merge_lora))
        x = torch.randn(3, mlp.gate_proj.in_features, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(eng.runner.forwards[0].mlp(x), mlp(x), rtol=1e-6, atol=1e-6)


def test_extend_prefill_feeds_flash_attn_the_whole_contexts_and_equals_transformers(tiny):
    """A prefill of rows that already hold cached tokens (prefix caching, a re-prefill after preemption): the
    varlen metadata counts each row's new tokens as queries and its whole context as keys (`cu_seqlens_k`,
    `max_seqlen_k`: read by flash-attn only), the heads read each row's last new token, and the logits equal
    transformers' forward of the whole sequences."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.scheduler import ScheduledBatch
    from engine.sequence import Sequence

    eng = LLMEngine(tiny, EngineConfig(num_kv_blocks=64, block_size=4))
    runner, bm = eng.runner, eng.block_manager
    seqs = [Sequence(list(range(5, 5 + n))) for n in (7, 3)]
    try:
        for extra in ((), (2, 5)):
            for s, n in zip(seqs, extra):
                s.token_ids += list(range(40, 40 + n))
            batch = ScheduledBatch(is_prefill=True)
            for s in seqs:
                batch.text_rows.append(batch.add_row(s, bm.append(s, len(s) - s.num_cached_tokens)))
            logits, _, _ = runner.run(batch)
        [step] = runner._steps
        meta = step.meta
        assert meta.cu_seqlens_q.tolist() == [0, 2, 7] and meta.cu_seqlens_k.tolist() == [0, 9, 17]
        assert (meta.max_seqlen_q, meta.max_seqlen_k) == (5, 9) and step.last.tolist() == [1, 6]
        with torch.no_grad():
            want = torch.stack([tiny.model(input_ids=torch.tensor([s.token_ids])).logits[0, -1] for s in seqs])
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)
    finally:
        for s in seqs:
            bm.free(s)


def test_the_engine_refuses_what_it_cannot_run(tiny):
    """Clear errors instead of wrong numbers: a model that is not Janus (peft-wrapped or not), and a RoPE whose
    tables depend on the sequence length (`dynamic`, `longrope`: the engine tabulates RoPE once per rollout)."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.model_runner import unwrap

    with pytest.raises(TypeError, match="JanusForConditionalGeneration"):
        unwrap(torch.nn.Linear(2, 2))
    rotary = tiny.model.model.language_model.rotary_emb
    default = rotary.rope_type
    for kind in ("dynamic", "longrope"):
        rotary.rope_type = kind
        try:
            with pytest.raises(NotImplementedError, match=f"rope_type '{kind}'"):
                LLMEngine(tiny, EngineConfig(num_kv_blocks=8))
        finally:
            rotary.rope_type = default
