import json
import math
import os

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
    (tmp_path / "bad.jsonl").write_text('["red", "c", "a.png"]\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object"):
        read_sft_jsonl(tmp_path / "bad.jsonl", bundle)


def test_sft_refuses_an_example_longer_than_the_models_positions(tmp_path):
    """As rollouts are checked: a chain past the trained positions would be silently out of distribution."""
    bundle = build_preset("tiny", image_size=64)
    [ok] = _examples(bundle, 1)
    long = SFTExample("p", "left " * bundle.max_positions, ok.image_tokens)
    with pytest.raises(ValueError, match=r"example 1: prompt \d+ \+ chain \d+ .* positions"):
        SFTTrainer(_config(tmp_path), bundle, [ok, long])


def test_resuming_with_other_lora_targets_is_refused(tmp_path):
    """peft ignores adapter weights the model has no module for: resuming a run with other target modules would
    silently restart the adapter from scratch."""
    bundle = build_preset("tiny", image_size=64)
    trainer = SFTTrainer(_config(tmp_path, use_lora=True, max_steps=1), bundle, _examples(bundle))
    trainer.train()
    other = SFTTrainer(_config(tmp_path, use_lora=True, max_steps=1, lora_target_modules=r".*language_model.*\.q_proj"),
                       build_preset("tiny", image_size=64), _examples(bundle))
    with pytest.raises(ValueError, match="no place for"):
        other.resume(tmp_path)


def test_sft_loss_is_the_cross_entropy_of_the_whole_accumulation_window(tmp_path):
    """Gradient accumulation changes nothing: 2 micro-batches of 2 give the loss and gradient of one batch of 4,
    and that loss is the hand-computed token-mean cross-entropy (text and image weighted) of a plain HF forward."""
    def sharp():  # text log-probs far from uniform, so per-token losses differ and their averaging matters
        b = build_preset("tiny", image_size=64)
        with torch.no_grad():
            b.model.lm_head.weight.mul_(10)
        return b

    bundle = sharp()
    g = torch.Generator().manual_seed(3)
    examples = [SFTExample(f"prompt {i}", " ".join(["red circle"] * (1 + 6 * i)),
                           torch.randint(0, 1024, (bundle.num_image_tokens,), generator=g)) for i in range(4)]
    weights = dict(text_loss_weight=0.5, image_loss_weight=2.0)
    model, nll_text, nll_image = bundle.model, [], []
    with torch.no_grad():
        for e in examples:
            p = bundle.encode_prompts([e.prompt], 0)[0]
            r = bundle.tokenizer(e.chain, add_special_tokens=False)["input_ids"] + [bundle.boi_id]
            ids = torch.tensor([p + r])
            logp = model(input_ids=ids).logits[0, len(p) - 1: -1].log_softmax(-1)
            nll_text.append(-logp.gather(-1, torch.tensor(r)[:, None]))
            emb = torch.cat([model.get_input_embeddings()(ids),
                             model.prepare_embeddings_for_image_generation(e.image_tokens[None, :-1])], 1)
            h = model.model.language_model(inputs_embeds=emb).last_hidden_state[0, ids.shape[1] - 1:]
            logp = model.model.generation_head(h).log_softmax(-1)
            nll_image.append(-logp.gather(-1, e.image_tokens[:, None]))
    expect = 0.5 * torch.cat(nll_text).mean() + 2.0 * torch.cat(nll_image).mean()
    runs = {}
    for ga, bs in ((2, 2), (1, 4)):
        b = bundle if ga == 2 else sharp()
        trainer = SFTTrainer(_config(tmp_path / str(ga), max_steps=1, per_device_train_batch_size=bs,
                                     gradient_accumulation_steps=ga, max_grad_norm=1e9, **weights), b, examples)
        runs[ga] = trainer.train()[0]
    assert runs[2]["loss"] == pytest.approx(float(expect), rel=1e-5)
    # each part on its own: a chain without its <begin_of_image> target moved them by opposite, cancelling amounts
    assert runs[2]["loss/text"] == pytest.approx(float(torch.cat(nll_text).mean()), rel=1e-5)
    assert runs[2]["loss/image"] == pytest.approx(float(torch.cat(nll_image).mean()), rel=1e-5)
    assert runs[1]["loss"] == pytest.approx(float(expect), rel=1e-5)
    assert runs[2]["grad_norm"] == pytest.approx(runs[1]["grad_norm"], rel=1e-4)


def test_sft_jsonl_reader_keeps_few_files_open(tmp_path):
    """A data set of more images than the process may open files still loads (images opened one batch at a time)."""
    resource = pytest.importorskip("resource")
    bundle = build_preset("tiny", image_size=64)
    n = 130
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 255 - i, 7)).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"prompt": "p", "chain": "c", "image": f"{i}.png"}) + "\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    taken = [int(fd) for fd in os.listdir("/proc/self/fd")]
    limit = next(lim for lim in range(100, hard) if lim - sum(fd < lim for fd in taken) >= 100)  # 100 fds free
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        examples = read_sft_jsonl(tmp_path / "data.jsonl", bundle)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(examples) == n
    images = [Image.open(tmp_path / f"{i}.png") for i in (0, 129)]
    assert torch.equal(torch.stack([examples[0].image_tokens, examples[129].image_tokens]),
                       encode_images(bundle.model.model.vqmodel, images))


def test_grpo_refuses_to_resume_an_sft_run(tmp_path):
    """An SFT checkpoint holds SFT's optimizer, step and data position: a GRPO run starts from its exported model,
    it does not resume it."""
    from gotr1.config import GRPOConfig
    from gotr1.grpo import GRPOTrainer
    from gotr1.rewards import CodebookSubsetJudge

    bundle = build_preset("tiny", image_size=64)
    SFTTrainer(_config(tmp_path / "sft", use_lora=True, max_steps=1), bundle, _examples(bundle)).train()
    grpo = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=2, prompts_per_step=1,
                                  max_reasoning_tokens=2, judge="codebook:512"),
                       build_preset("tiny", image_size=64), ["a cat"], CodebookSubsetJudge(512))
    with pytest.raises(ValueError, match="written by SFTTrainer, not GRPOTrainer"):
        grpo.resume(tmp_path / "sft")


def test_sft_visits_each_epoch_as_a_fresh_seeded_permutation(tmp_path):
    """Batches walk `random.Random(seed + epoch)`'s shuffle of the examples, a short last batch ending the epoch,
    then the next epoch's own shuffle (so a resumed run needs only epoch and position)."""
    import random

    bundle = build_preset("tiny", image_size=64)
    trainer = SFTTrainer(_config(tmp_path, per_device_train_batch_size=2, seed=7), bundle, _examples(bundle, 5))
    orders = []
    for epoch in (0, 1):
        order = list(range(5))
        random.Random(7 + epoch).shuffle(order)
        orders.append(order)
    assert orders[0] != orders[1]
    batches = [trainer.next_batch() for _ in range(6)]
    assert batches == [orders[0][:2], orders[0][2:4], orders[0][4:], orders[1][:2], orders[1][2:4], orders[1][4:]]
    assert trainer.data_state() == {"epoch": 1, "position": 6}


def test_sft_clips_the_gradient_follows_the_schedule_and_logs_every_logging_steps(tmp_path):
    """The optimizer applies a gradient of norm <= max_grad_norm (the log keeps the norm before clipping); the
    learning rate is transformers' cosine with warm-up over max_steps (hand values); the log holds every
    logging_steps-th step."""
    bundle = build_preset("tiny", image_size=64)
    trainer = SFTTrainer(_config(tmp_path, max_steps=4, warmup_steps=1, learning_rate=1e-3, max_grad_norm=1e-3,
                                 logging_steps=2, save_steps=100), bundle, _examples(bundle))
    applied = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.append(
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params if p.grad is not None])))))
    history = trainer.train()
    assert all(h["grad_norm"] > 1e-3 for h in history) and max(applied) <= 1e-3 * (1 + 1e-4)
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 7.5e-4, 2.5e-4, 0.0], abs=1e-12)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_what_trains_full_fine_tuning_and_lora(tmp_path):
    """Full fine-tuning trains the generating path (language model, image embeddings, generation aligner and head)
    and freezes the encoders (VQ, SigLIP, understanding aligner); LoRA takes r, alpha and dropout from the config
    and wraps the language model only."""
    bundle = build_preset("tiny", image_size=64)
    SFTTrainer(_config(tmp_path), bundle, _examples(bundle))
    trained = {n.split(".")[1] for n, p in bundle.model.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[1] for n, p in bundle.model.named_parameters() if not p.requires_grad}
    assert trained == {"language_model", "generation_embeddings", "generation_aligner", "generation_head"}
    assert frozen == {"vqmodel", "vision_model", "aligner"}
    bundle = build_preset("tiny", image_size=64)
    SFTTrainer(_config(tmp_path, use_lora=True, lora_r=4, lora_alpha=12, lora_dropout=0.25), bundle,
               _examples(bundle))
    lora = [(n, m) for n, m in bundle.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert lora and all("language_model" in n for n, _ in lora)
    for _, m in lora:
        assert m.r["default"] == 4 and m.scaling["default"] == 3.0 and m.lora_dropout["default"].p == 0.25
    assert all("lora_" in n for n, p in bundle.model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ fp16 loss scaling
def _fp16_trainer(path, **kw) -> SFTTrainer:
    bundle = build_preset("tiny", image_size=64, dtype=torch.float16)
    return SFTTrainer(_config(path, use_lora=True, lora_r=4, lora_alpha=8, dtype="float16", **kw), bundle,
                      _examples(bundle))


def test_fp16_skips_a_step_with_inf_gradients_and_halves_the_scale(tmp_path, poison_first_step):
    """As transformers' Trainer with fp16: the scaled step is skipped (parameters, optimizer state and learning rate
    untouched: the scheduler waits), the scale halves, and metrics.jsonl logs the scale and the skip; the next step
    trains at the halved scale. A disabled scaler (bf16) logs neither."""
    trainer = _fp16_trainer(tmp_path, max_steps=2, lr_scheduler_type="linear", save_steps=100)
    assert {p.dtype for p in trainer.params} == {torch.float32}  # peft's fp32 adapters on the fp16 model
    poison_first_step(trainer)
    before = [p.detach().clone() for p in trainer.params]
    [first] = trainer.train(max_steps=1)
    assert (first["loss_scale"], first["step_skipped"]) == (2.0**16, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert trainer.loss_scaler.scale == 2.0**15 and not trainer.optimizer.state
    assert trainer.scheduler.last_epoch == 0 and first["lr"] == 3e-3  # the linear decay has not begun
    second = trainer.train()[-1]
    assert (second["loss_scale"], second["step_skipped"]) == (2.0**15, 0.0) and math.isfinite(second["grad_norm"])
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert trainer.scheduler.last_epoch == 1 and second["lr"] == pytest.approx(1.5e-3)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["loss_scale"], m["step_skipped"]) for m in logged] == [(2.0**16, 1.0), (2.0**15, 0.0)]
    bundle = build_preset("tiny", image_size=64, dtype=torch.bfloat16)
    bf16 = SFTTrainer(_config(tmp_path / "bf16", use_lora=True, lora_r=4, lora_alpha=8, dtype="bfloat16",
                              max_steps=1), bundle, _examples(bundle))
    [row] = bf16.train()
    assert not bf16.loss_scaler.enabled and bf16.loss_scaler.scale == 1.0
    assert "loss_scale" not in row and "step_skipped" not in row


def test_fp16_full_fine_tuning_is_refused(tmp_path):
    """GradScaler cannot unscale fp16 gradients (nor would fp16 weights keep small updates): LoRA's fp32 adapters or
    bf16, said before any step."""
    bundle = build_preset("tiny", image_size=64, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype='float16' needs fp32 trainable parameters"):
        SFTTrainer(_config(tmp_path, dtype="float16"), bundle, _examples(bundle))


def test_fp16_resume_is_exact_and_restores_the_loss_scale(tmp_path, poison_first_step):
    """A skipped first step halves the scale before the checkpoint; the resumed run continues at that scale, with
    the same losses, scales, skips and parameters as the uninterrupted run. A checkpoint without scaler state (from
    before loss scaling) still resumes, at the initial scale."""
    full = _fp16_trainer(tmp_path / "full")
    poison_first_step(full)
    full.train()
    part = _fp16_trainer(tmp_path / "part")
    poison_first_step(part)
    part.train(max_steps=3)
    saved = part.loss_scaler.state_dict()
    assert saved["scale"] < 2.0**16
    resumed = _fp16_trainer(tmp_path / "part")
    resumed.resume(tmp_path / "part")
    assert resumed.loss_scaler.state_dict() == saved
    resumed.train()
    def rows(history):  # as JSON, where the skipped step's NaN grad_norm equals itself
        return [json.dumps({k: v for k, v in h.items() if k != "time_step"}, sort_keys=True) for h in history]

    assert rows(resumed.history) == rows(full.history)
    assert [h["step_skipped"] for h in full.history][0] == 1.0
    for (n1, p1), (n2, p2) in zip(full.bundle.model.named_parameters(), resumed.bundle.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    state_file = tmp_path / "part" / "checkpoint-3" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["scaler"] == saved
    del state["scaler"]
    torch.save(state, state_file)
    old = _fp16_trainer(tmp_path / "old")
    old.resume(tmp_path / "part" / "checkpoint-3")
    assert old.step == 3 and old.loss_scaler.scale == 2.0**16


def test_non_finite_gradients_without_loss_scaling_stop_training_before_the_step(tmp_path, poison_first_step):
    """bf16/fp32 have no scaler to skip a step: an inf gradient would have made every weight NaN. It is refused,
    parameters and optimizer untouched."""
    bundle = build_preset("tiny", image_size=64)
    trainer = SFTTrainer(_config(tmp_path, use_lora=True, lora_r=4, lora_alpha=8, max_steps=1), bundle,
                         _examples(bundle))
    poison_first_step(trainer)
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(FloatingPointError, match=r"the gradient norm is (inf|nan) \(the loss diverged\); the step"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and not trainer.optimizer.state
