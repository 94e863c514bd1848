"""Oracle tests of the rollout engine against transformers on the tiny preset (fp32, CPU).

Most tests use the 64 px variant (16 image tokens); one runs the real 576-token geometry.
"""
import dataclasses
import functools
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scheduler import assert_same_rollouts
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from engine.config import EngineConfig
from engine.lean import LoraWeights, add_norm, lean, plain_lora, projection, stacked
from engine.llm_engine import LLMEngine
from engine.model_runner import host_tensor
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Group, Sample, Sequence, sample_key
from gotr1.model import build_preset
from gotr1.reference import ReferenceGenerator
from kernels.cfg_sampling import cfg_sample_reference, philox_uniforms

PROMPTS = ["a red cat on a blue table", "two green squares"]


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", image_size=64)


@pytest.fixture(scope="module")
def engine(tiny):
    return LLMEngine(tiny, EngineConfig(num_kv_blocks=400, block_size=4))


@pytest.fixture(scope="module")
def odd():
    """Odd sizes (hidden 40: 5 query heads of dim 8 over one KV head, 3 layers) and RMSNorm weights off their
    all-ones init, so that the norms' weight multiply is exercised."""
    bundle = build_preset("tiny", image_size=64, hidden_size=40, num_heads=5, num_kv_heads=1, num_layers=3, seed=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "layernorm" in name or name.endswith("language_model.norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return bundle


def uncond_ids(bundle, ids):
    """transformers' rule (every token that is neither BOS nor BOI becomes PAD)."""
    return [t if t in (bundle.bos_id, bundle.boi_id) else bundle.pad_id for t in ids]


def teacher_forced(bundle, prompt_ids, reasoning_ids, image_tokens, *, text_t, image_t, cfg):
    """Log-probs of a finished sample by plain full forwards (transformers-janus-cpu.md §3.5), and the
    conditional image logits."""
    model = bundle.model
    with torch.no_grad():
        ids = torch.tensor([prompt_ids + reasoning_ids])
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].float()
        text = (logits / (text_t or 1.0)).log_softmax(-1).gather(-1, torch.tensor(reasoning_ids)[:, None])[:, 0]
        img = image_tokens[None]

        def image_logits(row):
            emb = torch.cat([model.get_input_embeddings()(torch.tensor([row])),
                             model.prepare_embeddings_for_image_generation(img[:, :-1])], 1)
            h = model.model.language_model(inputs_embeds=emb).last_hidden_state[0, len(row) - 1:]
            return model.model.generation_head(h).float()

        c = image_logits(ids[0].tolist())
        u = image_logits(uncond_ids(bundle, ids[0].tolist()))
        t = image_t or 1.0
        cond_lp = (c / t).log_softmax(-1).gather(-1, image_tokens[:, None])[:, 0]
        mixed_lp = ((u + cfg * (c - u)) / t).log_softmax(-1).gather(-1, image_tokens[:, None])[:, 0]
    return text, cond_lp, mixed_lp, c


@pytest.mark.parametrize("preset", ["tiny", "odd"])
def test_runner_logits_match_transformers_forward(preset, request):
    """Packed varlen prefill, then decode steps, through the paged cache: text logits == HF's full forward."""
    tiny = request.getfixturevalue(preset)
    engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=400, block_size=4))
    runner, bm = engine.runner, engine.block_manager
    g = torch.Generator().manual_seed(0)
    rows = [tiny.encode_prompts([p], 8)[0] for p in PROMPTS]
    rows[1] += torch.randint(10, 500, (3,), generator=g).tolist()
    seqs = [Sequence(list(r)) for r in rows]
    try:
        for step in range(4):
            batch = ScheduledBatch(is_prefill=step == 0)
            for s in seqs:
                copies = bm.append(s, len(s) - s.num_cached_tokens)
                batch.text_rows.append(batch.add_row(s, copies))
            logits, _, _ = runner.run(batch)
            with torch.no_grad():
                expect = torch.stack([tiny.model(input_ids=torch.tensor([s.token_ids])).logits[0, -1] for s in seqs])
            torch.testing.assert_close(logits, expect, rtol=0, atol=1e-4)
            for s, row in zip(seqs, logits):
                s.token_ids.append(int(row.argmax()))
    finally:
        for s in seqs:
            bm.free(s)
    assert bm.num_used_blocks == 0


@settings(max_examples=30, deadline=None)
@given(st.one_of(
    st.sampled_from([(torch.int32, 2**31), (torch.int64, 2**63)]).flatmap(
        lambda kind: st.tuples(st.just(kind[0]), st.lists(st.integers(-kind[1], kind[1] - 1), max_size=40))),
    st.tuples(st.just(torch.float32), st.lists(st.floats(allow_nan=False, max_value=3e38, min_value=-3e38),
                                               max_size=40))))
def test_host_tensor_equals_torch_tensor(case):
    dtype, values = case
    t = host_tensor(values, dtype, torch.device("cpu"))
    assert t.dtype == dtype and torch.equal(t, torch.tensor(values, dtype=dtype))


def test_lean_forwards_equal_module_forwards(odd):
    """Every module the engine runs through `engine.lean` takes the direct path and gives the module's own bits
    (fp32, random weights, odd sizes, an odd number of rows); RMSNorm's native CPU call within 5e-7 relative."""
    janus = odd.model
    lm = janus.model.language_model
    g = torch.Generator().manual_seed(0)
    hidden, embed_dim = lm.config.hidden_size, janus.model.generation_embeddings.embedding_dim

    def floats(width):
        return torch.randn(7, width, generator=g)

    cases = [(janus.lm_head, floats(hidden)), (lm.norm, floats(hidden)),
             (janus.model.generation_head, floats(hidden)), (janus.model.generation_aligner, floats(embed_dim)),
             (lm.embed_tokens, torch.randint(0, lm.config.vocab_size, (7,), generator=g)),
             (janus.model.generation_embeddings, torch.randint(0, 1024, (7,), generator=g))]
    for layer in lm.layers:
        a = layer.self_attn
        cases += [(m, floats(hidden)) for m in (layer.input_layernorm, layer.post_attention_layernorm, a.q_proj,
                                                a.k_proj, a.v_proj, layer.mlp)]
        cases.append((a.o_proj, floats(a.o_proj.in_features)))
    with torch.no_grad():
        for module, x in cases:
            f = lean(module)
            assert f is not module, type(module).__name__
            out = f(x)
            if isinstance(module, LlamaRMSNorm):
                torch.testing.assert_close(out, module(x), rtol=5e-7, atol=1e-7)
            else:
                assert torch.equal(out, module(x)), type(module).__name__
            assert out.isfinite().all()


def test_add_norm_is_the_residual_add_then_the_lean_norm(odd, monkeypatch, gpu_rounding):
    """`add_norm` gives `(h + d, norm(h + d))`: the torch add and `lean`'s norm (the fp32 CPU path, to the bit of
    separate calls), or one `add_rms_norm` launch where `lean` picks the one-kernel norm (as for 16 bits on a GPU;
    emulated here by making `lean` pick it for a bf16 norm on the CPU)."""
    import engine.lean as lean_module
    from kernels.rms_norm import add_rms_norm, rms_norm

    norm = odd.model.model.language_model.layers[0].input_layernorm
    g = torch.Generator().manual_seed(1)
    h, d = (torch.randn(7, norm.weight.shape[0], generator=g) for _ in range(2))
    s, y = add_norm(norm)(h, d)
    assert torch.equal(s, h + d) and torch.equal(y, lean(norm)(h + d))
    norm16 = type(norm)(norm.weight.shape[0], eps=norm.variance_epsilon).to(torch.bfloat16)
    with torch.no_grad():
        norm16.weight.copy_(norm.weight)
    real_lean = lean_module.lean
    monkeypatch.setattr(lean_module, "lean", lambda m, *a, **k: functools.partial(
        rms_norm, weight=m.weight, eps=m.variance_epsilon) if m is norm16 else real_lean(m, *a, **k))
    f = add_norm(norm16)
    assert f.func is add_rms_norm
    h16, d16 = h.bfloat16(), d.bfloat16()
    s, y = f(h16, d16)
    with torch.no_grad():
        assert torch.equal(s, h16 + d16)
        torch.testing.assert_close(y.float(), norm16(h16 + d16).float(), rtol=2**-6, atol=1e-6)


def test_lean_leaves_wrapped_modules_to_their_own_forward():
    """A hook, a 16-bit RMSNorm (transformers rounds between its ops) or a peft LoRA layer is called, never
    bypassed; a module composed of such children still uses them (LoRA inline inside a lean MLP)."""
    peft = pytest.importorskip("peft")
    bundle = build_preset("tiny", image_size=64, seed=3)
    layer = bundle.model.model.language_model.layers[0]
    hook = layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: out * 2)
    assert lean(layer.self_attn.q_proj) is layer.self_attn.q_proj
    hook.remove()
    assert lean(layer.self_attn.q_proj) is not layer.self_attn.q_proj
    norm16 = type(layer.input_layernorm)(8).to(torch.bfloat16)
    assert lean(norm16) is norm16
    pm = peft.get_peft_model(bundle.model, peft.LoraConfig(r=4, target_modules=r".*layers\.0\.mlp\.gate_proj"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
        mlp = layer.mlp
        assert lean(mlp.gate_proj) is mlp.gate_proj  # the peft layer
        x = torch.randn(5, 64, generator=g)
        with pm.disable_adapter():
            base = mlp(x)
            assert not plain_lora(mlp.gate_proj)
        torch.testing.assert_close(lean(mlp)(x), mlp(x), rtol=0, atol=0)
        assert not torch.allclose(mlp(x), base)
        # Given the engine's LoRA weights: one linear on a merged weight, or inline (base, shrink, addmm).
        gate = mlp.gate_proj
        a, b, scaling = gate.lora_A["default"].weight, gate.lora_B["default"].weight, gate.scaling["default"]
        merged = LoraWeights(merged=gate.base_layer.weight + scaling * b @ a)
        inline = LoraWeights(down=a, up=scaling * b)
        assert plain_lora(gate) and lean(gate, lora=lambda m: merged) is not gate
        for weights in (merged, inline):
            torch.testing.assert_close(lean(mlp, lora=lambda m, w=weights: w)(x), mlp(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lean(gate, lora=lambda m, w=weights: w)(x[None]), gate(x[None]),
                                       rtol=1e-5, atol=1e-5)  # any leading shape
        pm.merge_adapter()
        assert not plain_lora(gate) and lean(gate, lora=lambda m: merged) is gate
        pm.unmerge_adapter()
    dora = peft.get_peft_model(build_preset("tiny", image_size=64, seed=3).model, peft.LoraConfig(
        r=4, use_dora=True, target_modules=r".*layers\.0\.mlp\.gate_proj"))
    assert not plain_lora(dora.base_model.model.model.language_model.layers[0].mlp.gate_proj)


@pytest.fixture(scope="module")
def fused_engine(tiny):
    """The engine as a GPU runs it: q/k/v and gate/up as one matmul each."""
    return LLMEngine(tiny, EngineConfig(num_kv_blocks=400, block_size=4, fuse_projections=True))


@pytest.mark.parametrize("min_r,max_r,fused", [(0, 10, False), (6, 6, False), (0, 10, True)])
def test_greedy_equals_reference_generator(tiny, engine, fused_engine, min_r, max_r, fused):
    """Greedy reasoning and greedy CFG image tokens == transformers' generate (text, then image mode), with the
    projections as the modules run them or fused."""
    engine = fused_engine if fused else engine
    params = SamplingParams(n=2, text_temperature=0, image_temperature=0, max_reasoning_tokens=max_r,
                            min_reasoning_tokens=min_r, decode_images=False)
    ours = engine.generate(PROMPTS, params, use_tqdm=False)
    ref = ReferenceGenerator(tiny).generate(PROMPTS, n=2, text_temperature=0, image_temperature=0,
                                            max_reasoning_tokens=max_r, min_reasoning_tokens=min_r,
                                            decode_images=False)
    for group, ref_group, prompt in zip(ours, ref, PROMPTS):
        assert group.prompt == prompt and len(group.samples) == 2
        for s, r in zip(group.samples, ref_group):
            assert tiny.bos_id not in s.reasoning_ids  # else transformers' unconditional row differs (docstring)
            assert s.reasoning_ids == r.reasoning_ids and s.boi_forced == r.boi_forced
            assert s.image_tokens.tolist() == r.image_tokens.tolist()
            assert s.prompt_ids == r.prompt_ids and s.reasoning_text == r.reasoning_text
            assert s.image is None and s.image_tokens.shape == (16,)
    assert engine.block_manager.num_used_blocks == 0


def test_logprobs_equal_teacher_forced_forward(tiny, engine):
    """Sampling with temperature, top-k, top-p and a min-length ban on BOI: the returned log-probs are the
    policy's, as a teacher-forced forward of the same sequence computes them."""
    params = SamplingParams(n=3, text_temperature=0.8, image_temperature=1.3, top_k=50, top_p=0.9, cfg_weight=3.0,
                            max_reasoning_tokens=9, min_reasoning_tokens=3, seed=7, decode_images=True)
    forced = dataclasses.replace(params, n=1, max_reasoning_tokens=5, min_reasoning_tokens=5)  # BOI banned, forced
    weak = dataclasses.replace(params, n=1, cfg_weight=0.5)  # guidance below 1 is guidance too (unconditional rows)
    groups = engine.generate(PROMPTS + PROMPTS[:1], [params, forced, weak], use_tqdm=False)
    assert groups[1].samples[0].boi_forced and len(groups[1].samples[0].reasoning_ids) == 6
    for p, group in zip([params, forced, weak], groups):
        for s in group.samples:
            assert p.min_reasoning_tokens + 1 <= len(s.reasoning_ids) <= p.max_reasoning_tokens + 1
            assert s.reasoning_ids[-1] == tiny.boi_id and s.image.size == (64, 64)
            text, cond, mixed, _ = teacher_forced(tiny, s.prompt_ids, s.reasoning_ids, s.image_tokens, text_t=0.8,
                                                  image_t=1.3, cfg=p.cfg_weight)
            torch.testing.assert_close(s.text_logprobs, text, rtol=0, atol=1e-4)
            torch.testing.assert_close(s.image_logprobs, cond, rtol=0, atol=1e-4)
            torch.testing.assert_close(s.image_mixed_logprobs, mixed, rtol=0, atol=1e-4)


def test_seeded_rollouts_reproduce_and_differ_by_seed(engine):
    params = SamplingParams(n=2, max_reasoning_tokens=6, seed=11, decode_images=False)
    a = engine.generate(PROMPTS, params, use_tqdm=False)
    b = engine.generate(PROMPTS, params, use_tqdm=False)
    c = engine.generate(PROMPTS, dataclasses.replace(params, seed=12), use_tqdm=False)
    key = [[(s.reasoning_ids, s.image_tokens.tolist()) for s in g.samples] for g in (a + b + c)]
    assert key[:2] == key[2:4] and key[:2] != key[4:]
    assert key[0][0] != key[0][1]  # the samples of a group differ
    zero = dataclasses.replace(params, seed=0, max_reasoning_tokens=2)  # 0 is a seed, not "no seed"
    x, y = (engine.generate(PROMPTS[:1], zero, use_tqdm=False)[0] for _ in range(2))
    assert [s.image_tokens.tolist() for s in x.samples] == [s.image_tokens.tolist() for s in y.samples]


@pytest.mark.parametrize("head", ["text", "image"])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_nan_logits_are_refused_by_request_not_sampled(head, temperature):
    """A non-finite weight (a diverged update) made NaN logits; each sampling path then picked its own token and
    returned NaN log-probs to the GRPO loss. Now the step names the requests; the engine drains."""
    bundle = build_preset("tiny", image_size=64)
    weight = bundle.model.lm_head.weight if head == "text" else bundle.model.model.generation_head.vision_head.weight
    with torch.no_grad():
        weight[5] = float("nan")
    engine = LLMEngine(bundle, EngineConfig(num_kv_blocks=100, block_size=4))
    params = SamplingParams(n=2, max_reasoning_tokens=3, text_temperature=temperature,
                            image_temperature=temperature, decode_images=False, seed=0)
    with pytest.raises(FloatingPointError, match=r"logits are NaN for request\(s\) \['0'\]"):
        engine.generate(PROMPTS[:1], params, use_tqdm=False)
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_sample_keys_do_not_collide():
    """Distinct (seed, index) pairs nearby, and negative seeds, give distinct 63-bit keys (a sum `seed + index`
    would collide along every anti-diagonal)."""
    keys = {sample_key(seed, i) for seed in range(-8, 24) for i in range(16)}
    assert len(keys) == 32 * 16 and all(0 <= k < 2**63 for k in keys)


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=2.0), dict(top_k=-1), dict(top_k=5.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_p=float("nan")), dict(cfg_weight=-0.5),
                                 dict(max_reasoning_tokens=-1), dict(max_reasoning_tokens=2.5),
                                 dict(min_reasoning_tokens=-1), dict(seed="7"), dict(seed=1.5)])
def test_sampling_params_refuse_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_sampling_params_bounds_are_accepted():
    SamplingParams(n=1, top_k=0, top_p=1.0, cfg_weight=0.0, max_reasoning_tokens=0, min_reasoning_tokens=0, seed=-5)


def test_sample_counts_and_boi_rules_by_hand():
    """A sample's counts through its text and image phases, and the `<begin_of_image>` ban / force boundaries
    (`ahead` steps into a multi-step window)."""
    boi = 99
    params = SamplingParams(n=1, max_reasoning_tokens=4, min_reasoning_tokens=2, cfg_weight=0.5)
    group = Group(request_id="r", prompt="p", prompt_ids=[1, 2, 3], params=params, seed=0, num_image_tokens=5)
    s = Sample(group=group, index=0, key=0, cond=Sequence([1, 2, 3]))
    assert group.max_len == 3 + 4 + 1 + 5 and group.guided and s.peak_rows == 2
    assert (s.num_reasoning_tokens, s.num_image_tokens, s.reasoning_ids, s.image_token_ids) == (0, 0, [], [])
    assert [s.suppress_boi(a) for a in range(4)] == [True, True, False, False]
    assert [s.force_boi(a) for a in range(6)] == [False] * 4 + [True] * 2
    s.cond.token_ids += [10, 11]
    assert not s.suppress_boi() and not s.force_boi(1) and s.force_boi(2)
    s.cond.token_ids.append(boi)
    s.cond.image_start = len(s.cond)
    assert s.in_image_phase and s.awaits_uncond
    s.cond.token_ids += [7, 8]
    assert (s.num_reasoning_tokens, s.num_image_tokens, s.reasoning_ids, s.image_token_ids) == (3, 2, [10, 11, boi],
                                                                                                [7, 8])
    unguided = Group(request_id="u", prompt="p", prompt_ids=[1], params=SamplingParams(cfg_weight=1.0), seed=0,
                     num_image_tokens=5)
    u = Sample(group=unguided, index=0, key=0, cond=Sequence([1, boi], image_start=2))
    assert not unguided.guided and u.peak_rows == 1 and not u.awaits_uncond


def _sample_at(group: Group, index: int, reasoning: int, images: int | None, boi: int) -> Sample:
    """Sample `index` of `group` with `reasoning` text tokens so far, or in its image phase with `images` image
    tokens (`reasoning` then counts `<begin_of_image>`)."""
    ids = list(group.prompt_ids) + [5 + index] * reasoning
    s = Sample(group=group, index=index, key=sample_key(group.seed, index), cond=Sequence(ids))
    if images is not None:
        s.cond.token_ids[-1] = boi
        s.cond.image_start = len(ids)
        s.cond.token_ids += [3] * images
    return s


def test_sampler_rows_equal_the_reference_op_with_their_own_settings_and_counters():
    """`Sampler` against `cfg_sample_reference` row by row: each row's own temperature (text or image), top-k,
    top-p and CFG weight, uniforms from (its sample's key, the position it samples + step); BOI banned below
    `min_reasoning_tokens` and forced at `max_reasoning_tokens`, with the raw logits' log-probs for those rows."""
    boi, vocab = 7, 64
    a = Group(request_id="a", prompt="", prompt_ids=[1, 2, 3], seed=5, num_image_tokens=16,
              params=SamplingParams(n=4, text_temperature=0.7, image_temperature=1.3, top_k=20, top_p=0.6,
                                    cfg_weight=3.0, max_reasoning_tokens=4, min_reasoning_tokens=2))
    b = Group(request_id="b", prompt="", prompt_ids=[1, 2], seed=6, num_image_tokens=16,
              params=SamplingParams(n=2, text_temperature=0.0, image_temperature=0.9, top_p=0.8, cfg_weight=1.0,
                                    max_reasoning_tokens=6, min_reasoning_tokens=1))
    text = [_sample_at(a, i, r, None, boi) for i, r in enumerate((0, 1, 3, 4))]
    text += [_sample_at(b, i, r, None, boi) for i, r in enumerate((0, 2))]
    image = [_sample_at(a, i, 3, n, boi) for i, n in enumerate((0, 5))] + [_sample_at(b, 0, 2, 9, boi)]
    for s in image[:2]:  # the guided request's rows have unconditional rows, the unguided one's not
        s.uncond = Sequence(list(s.cond.token_ids), image_start=s.cond.image_start)
    g = torch.Generator().manual_seed(0)
    text_logits = torch.randn(len(text), vocab, generator=g) * 0.5  # flat: the uniforms decide the tokens
    text_logits[:, boi] += 3  # BOI the likeliest token (p ~ 0.25): the ban shows
    cond, uncond = torch.randn(2, len(image), vocab, generator=g) * 0.5
    sampler = Sampler(boi, torch.device("cpu"))

    def expect(s, c, u, step, image_phase):
        p = s.group.params
        t = p.image_temperature if image_phase else p.text_temperature
        counter = torch.tensor([len(s.cond) + step])
        ref = cfg_sample_reference(
            c[None], None if u is None else u[None], cfg_weight=torch.tensor([p.cfg_weight if image_phase else 1.0]),
            temperature=torch.tensor([t]), top_k=torch.tensor([p.top_k]), top_p=torch.tensor([p.top_p]),
            uniforms=philox_uniforms(torch.tensor([s.key]), counter, vocab))
        return ref.tokens[0], ref.logprobs[0], ref.mixed_logprobs[0]

    every = list(range(len(text)))
    # new rows, new settings; the last call: every row banned, none forced (a lock-step group)
    for step, order in ((0, every), (1, every[::-1]), (0, [0, 1])):
        rows = [text[i] for i in order]
        tokens, logprobs = sampler.text_tensors(text_logits[order], rows, step)
        for s, raw, tok, lp in zip(rows, text_logits[order], tokens, logprobs):
            banned = raw.clone()
            if s.suppress_boi(step):
                banned[boi] = -math.inf
            ref_tok, _, _ = expect(s, banned, None, step, False)
            ref_tok = boi if s.force_boi(step) else ref_tok
            assert tok == ref_tok and (tok != boi or not s.suppress_boi(step))
            t = s.group.params.text_temperature or 1.0
            torch.testing.assert_close(lp, torch.log_softmax(raw / t, -1)[ref_tok], rtol=0, atol=1e-6)
    paired = sampler.paired_rows(image)
    assert paired.tolist() == [0, 1]
    for step in (0, 1):
        out = sampler.image_tensors(cond, uncond[:2], image, step, paired)
        for r, s in enumerate(image):
            ref = expect(s, cond[r], uncond[r] if s.uncond is not None else None, step, True)
            assert out.tokens[r] == ref[0]
            torch.testing.assert_close(torch.stack([out.logprobs[r], out.mixed_logprobs[r]]), torch.stack(ref[1:]),
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg_weight,tight_blocks", [(5.0, 48), (1.0, 20)])
def test_image_phase_from_reasoning_kv_equals_reprefill(tiny, cfg_weight, tight_blocks):
    """Without preemption the image phase continues from the reasoning KV; a pool so small that samples are
    preempted forces their prompt + chain (+ image tokens so far) to be prefilled again. Same tokens, same
    log-probs, with sampling on, with and without unconditional rows."""
    params = SamplingParams(n=4, max_reasoning_tokens=8, min_reasoning_tokens=2, cfg_weight=cfg_weight, seed=3,
                            decode_images=False)
    roomy = LLMEngine(tiny, EngineConfig(num_kv_blocks=400, block_size=4))
    tight = LLMEngine(tiny, EngineConfig(num_kv_blocks=tight_blocks, block_size=4))
    a = roomy.generate(PROMPTS, params, use_tqdm=False)
    b = tight.generate(PROMPTS, params, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0 and roomy.scheduler.num_preemptions == 0
    assert tight.peak_used_blocks <= tight_blocks
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga.samples, gb.samples):
            assert sa.reasoning_ids == sb.reasoning_ids
            assert sa.image_tokens.tolist() == sb.image_tokens.tolist()
            for x, y in ((sa.text_logprobs, sb.text_logprobs), (sa.image_logprobs, sb.image_logprobs),
                         (sa.image_mixed_logprobs, sb.image_mixed_logprobs)):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-4)
            assert torch.equal(sb.image_mixed_logprobs, sb.image_logprobs) == (cfg_weight == 1)


@pytest.mark.parametrize("cfg_weight", [5.0, 1.0])
def test_mixed_text_image_batches_equal_each_sample_alone(tiny, engine, monkeypatch, cfg_weight):
    """Two requests with different settings decode together (text rows and image rows in the same steps; at
    `cfg_weight` 1 the first request's image rows have no unconditional row, the second's do); every sample
    equals itself run alone (same request seed and sample index)."""
    params = [SamplingParams(n=3, max_reasoning_tokens=2, image_temperature=0.9, cfg_weight=cfg_weight, seed=5,
                             decode_images=False),
              SamplingParams(n=2, max_reasoning_tokens=12, min_reasoning_tokens=8, text_temperature=1.2, top_k=20,
                             cfg_weight=4.0, seed=9, decode_images=False)]
    kinds = []
    run = engine.runner.run

    def spy(batch, *step):
        pairs = len(batch.uncond_rows)
        kinds.append((bool(batch.text_samples), bool(batch.image_samples), batch.is_prefill,
                      0 < pairs < len(batch.image_samples)))
        return run(batch, *step)

    monkeypatch.setattr(engine.runner, "run", spy)
    together = engine.generate(PROMPTS, params, use_tqdm=False)
    assert (True, True, False, False) in kinds  # some decode step held text rows and image rows at once
    # at cfg_weight 1, some image step sampled the first request without and the second with unconditional rows
    assert any(k[3] for k in kinds) == (cfg_weight == 1)
    for prompt, p, group in zip(PROMPTS, params, together):
        for i, s in enumerate(group.samples):
            rid = engine._add(prompt, s.prompt_ids, p, None)
            g = engine.scheduler.groups[rid]
            g.samples = g.samples[i:i + 1]  # sample i of this request, and nothing else
            outs = []
            while engine.has_unfinished():
                outs += engine.step()
            [alone] = outs[0].samples
            assert alone.reasoning_ids == s.reasoning_ids
            assert alone.image_tokens.tolist() == s.image_tokens.tolist()
            torch.testing.assert_close(alone.image_mixed_logprobs, s.image_mixed_logprobs, rtol=0, atol=1e-5)
            torch.testing.assert_close(alone.image_logprobs, s.image_logprobs, rtol=0, atol=1e-5)
            torch.testing.assert_close(alone.text_logprobs, s.text_logprobs, rtol=0, atol=1e-5)
            if p.cfg_weight == 1:
                assert torch.equal(s.image_mixed_logprobs, s.image_logprobs)


def test_cfg_weight_1_runs_no_uncond_rows_and_equals_the_cfg_path(tiny, engine, monkeypatch):
    """cfg_weight 1, greedy and sampled: no unconditional row, prefix or block is ever held, and the outputs equal
    (a) the same requests forced through the CFG path (unconditional rows mixed with w = 1) and (b) a teacher-forced
    forward: log-probs of the conditional logits, greedy image tokens their argmax."""
    params = [SamplingParams(n=2, text_temperature=0, image_temperature=0, cfg_weight=1.0, max_reasoning_tokens=6,
                             decode_images=False),
              SamplingParams(n=2, text_temperature=0.8, image_temperature=1.3, top_k=50, top_p=0.9, cfg_weight=1.0,
                             max_reasoning_tokens=9, min_reasoning_tokens=3, seed=7, decode_images=False)]
    sched, bm, run = engine.scheduler, engine.block_manager, engine.runner.run
    steps = []

    def spy(batch, *step):
        groups = sched.groups.values()
        held = {b for g in groups for s in g.samples for b in s.cond.block_table}
        held |= {b for g in groups if g.prompt_seq is not None for b in g.prompt_seq.block_table}
        steps.append((len(batch.seqs), len(batch.uncond_rows), sched.uncond_prefix is not None,
                      bm.num_used_blocks - len(held)))
        return run(batch, *step)

    monkeypatch.setattr(engine.runner, "run", spy)
    ours = engine.generate(PROMPTS, params, use_tqdm=False)
    rows, uncond_rows, prefix, foreign_blocks = map(sum, zip(*steps))
    assert uncond_rows == prefix == foreign_blocks == 0  # every block in use belongs to a prompt or cond row
    steps.clear()
    monkeypatch.setattr(Group, "guided", property(lambda self: True))  # the CFG path, as before cfg_weight 1 skipped it
    cfg_path = engine.generate(PROMPTS, params, use_tqdm=False)
    cfg_rows, cfg_uncond_rows, cfg_prefix, _ = map(sum, zip(*steps))
    assert cfg_uncond_rows > 0 and cfg_prefix > 0 and rows < cfg_rows
    for p, group, cfg_group in zip(params, ours, cfg_path):
        for s, c in zip(group.samples, cfg_group.samples):
            assert s.reasoning_ids == c.reasoning_ids and s.image_tokens.tolist() == c.image_tokens.tolist()
            for x, y in ((s.text_logprobs, c.text_logprobs), (s.image_logprobs, c.image_logprobs),
                         (s.image_mixed_logprobs, c.image_mixed_logprobs)):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
            assert torch.equal(s.image_mixed_logprobs, s.image_logprobs)
            text, cond, _, logits = teacher_forced(tiny, s.prompt_ids, s.reasoning_ids, s.image_tokens,
                                                   text_t=p.text_temperature, image_t=p.image_temperature, cfg=1.0)
            torch.testing.assert_close(s.text_logprobs, text, rtol=0, atol=1e-4)
            torch.testing.assert_close(s.image_logprobs, cond, rtol=0, atol=1e-4)
            if p.image_temperature == 0:
                assert s.image_tokens.tolist() == logits.argmax(-1).tolist()
    assert ours[1].samples[0].image_tokens.tolist() != ours[1].samples[1].image_tokens.tolist()  # sampled


@pytest.fixture(scope="module")
def eager_to_draw(boi_biased_tiny):
    """The tiny preset with `<begin_of_image>` about 9% likely per reasoning token."""
    return boi_biased_tiny(64, 4.0)


@pytest.mark.parametrize("num_kv_blocks", [2000, 48])
def test_multi_step_batches_equal_single_steps(eager_to_draw, monkeypatch, num_kv_blocks):
    """Multi-step windows (tokens fed back on the device, one host sync per window; text rows that sample BOI
    early run wasted steps), whole or cut short by `step(interrupt=...)`, give the single-step engine's tokens,
    on a roomy pool and on one that preempts. A lock-step request (min = max reasoning) decodes in the same
    batches either way: its log-probs are bit-equal; the others share steps with different rows, so theirs may
    move by a float rounding."""
    tiny = eager_to_draw
    params = [SamplingParams(n=3, max_reasoning_tokens=14, text_temperature=1.5, cfg_weight=5.0, seed=1,
                             decode_images=False),
              SamplingParams(n=2, max_reasoning_tokens=9, min_reasoning_tokens=3, text_temperature=1.2, top_k=20,
                             cfg_weight=1.0, seed=9, decode_images=False)]
    lockstep = SamplingParams(n=3, max_reasoning_tokens=7, min_reasoning_tokens=7, seed=4, decode_images=False)
    wasted, batches = [], []
    postprocess, schedule = Scheduler.postprocess, Scheduler.schedule

    def spy(self, batch, text_tokens, *args):  # steps a text row ran after its BOI, per window
        wasted.append(sum(len(t) - 1 - t.index(tiny.boi_id) for t in text_tokens if tiny.boi_id in t))
        return postprocess(self, batch, text_tokens, *args)

    monkeypatch.setattr(Scheduler, "postprocess", spy)
    monkeypatch.setattr(Scheduler, "schedule", lambda self: batches.append(schedule(self)) or batches[-1])
    runs = {}
    for k, cut in ((1, None), (16, None), (16, itertools.cycle([False] * 4 + [True, False, True]).__next__)):
        eng = LLMEngine(tiny, EngineConfig(num_kv_blocks=num_kv_blocks, block_size=4, num_scheduler_steps=k))
        monkeypatch.setattr(eng, "step", functools.partial(LLMEngine.step, eng, interrupt=cut))
        runs[k, cut is not None] = (eng.generate(PROMPTS, params, use_tqdm=False),
                                    eng.generate(PROMPTS[:1], lockstep, use_tqdm=False))
        assert (sum(wasted) > 0) == (k > 1)  # BOI sampled inside a window, its row idle till the window ended
        assert eng.block_manager.num_used_blocks == 0
        assert (eng.scheduler.num_preemptions > 0) == (num_kv_blocks == 48)
        planned = sum(b.num_steps for b in batches)
        if cut is None:
            assert eng.num_steps == planned
            assert (2 * len(batches) < eng.num_steps) == (k > 1)  # most forwards ran without a host sync of their own
        else:
            assert len(batches) < eng.num_steps < planned  # windows were cut, after more than one step
        wasted.clear()
        batches.clear()
    single, single_lock = runs[1, False]
    for multi, multi_lock in (runs[16, False], runs[16, True]):
        _assert_same_rollouts(multi, multi_lock, single, single_lock)


def test_a_window_reads_its_samples_in_one_copy(tiny, monkeypatch):
    """A decode window's tokens and log-probs come to the host in one copy, on a GPU its one sync (a CUDA test
    counts the syncs there); here the `Tensor.cpu` calls of the window's `step()` stand in for them."""
    eng = LLMEngine(tiny, EngineConfig(num_kv_blocks=200, block_size=4))
    eng.add_request(PROMPTS[0], SamplingParams(n=2, max_reasoning_tokens=12, min_reasoning_tokens=12, seed=0,
                                               decode_images=False))
    eng.step()  # the prefill
    copies, cpu, steps = [], torch.Tensor.cpu, eng.num_steps
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or cpu(self, *a, **k))
    eng.step()
    monkeypatch.undo()
    assert eng.num_steps - steps > 1 and len(copies) == 1, copies
    while eng.scheduler.has_unfinished():
        eng.step()
    assert eng.block_manager.num_used_blocks == 0


def _assert_same_rollouts(multi, multi_lock, single, single_lock):
    for group, ref in zip(multi + multi_lock, single + single_lock):
        for s, r in zip(group.samples, ref.samples):
            assert s.reasoning_ids == r.reasoning_ids and s.boi_forced == r.boi_forced
            assert torch.equal(s.image_tokens, r.image_tokens)
            for x, y in ((s.text_logprobs, r.text_logprobs), (s.image_logprobs, r.image_logprobs),
                         (s.image_mixed_logprobs, r.image_mixed_logprobs)):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    for s, r in zip(multi_lock[0].samples, single_lock[0].samples):
        assert torch.equal(s.text_logprobs, r.text_logprobs) and torch.equal(s.image_logprobs, r.image_logprobs)
        assert torch.equal(s.image_mixed_logprobs, r.image_mixed_logprobs)


def test_skinny_matmul_projections_equal_f_linear(tiny, monkeypatch):
    """`EngineConfig.skinny_matmul`: projections and heads of steps with at most 64 rows (decode steps, short
    prefills) through `kernels.skinny_matmul` (Triton's interpreter here); greedy tokens equal the default
    engine's, log-probs to float rounding (the sums' order differs)."""
    import kernels.skinny_matmul as module

    calls = []
    real = module.skinny_matmul
    monkeypatch.setattr(module, "skinny_matmul", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    params = SamplingParams(n=2, text_temperature=0, image_temperature=0, max_reasoning_tokens=3, decode_images=False)
    default, skinny = (LLMEngine(tiny, EngineConfig(num_kv_blocks=100, block_size=16, skinny_matmul=flag)).generate(
        PROMPTS[:1], params, use_tqdm=False)[0] for flag in (False, True))
    assert calls and min(calls) <= 4  # decode steps: 2 samples, CFG pairs
    for a, b in zip(default.samples, skinny.samples):
        assert a.reasoning_ids == b.reasoning_ids and torch.equal(a.image_tokens, b.image_tokens)
        for x, y in ((a.text_logprobs, b.text_logprobs), (a.image_logprobs, b.image_logprobs)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


def test_prompt_kv_is_computed_once_and_uncond_prefix_is_shared(tiny):
    bs = 4
    eng = LLMEngine(tiny, EngineConfig(num_kv_blocks=400, block_size=bs, num_scheduler_steps=1))  # steps seen
    params = SamplingParams(n=4, max_reasoning_tokens=5, min_reasoning_tokens=5, seed=0, decode_images=False)
    rids = [eng.add_request(p, params) for p in PROMPTS]
    bm = eng.block_manager
    lens = [len(g.prompt_ids) for g in eng.scheduler.groups.values()]
    eng.step()  # one prefill step: each prompt once
    assert bm.num_used_blocks == sum(math.ceil(n / bs) for n in lens)
    eng.step()  # first decode: 4 samples per prompt fork the prompt blocks, copy only a partial last block
    copies = sum(3 if n % bs else 0 for n in lens)
    fresh = sum(4 if n % bs == 0 else 0 for n in lens)
    assert bm.num_used_blocks == sum(math.ceil(n / bs) for n in lens) + copies + fresh
    done = []
    saw_pairs = False
    while eng.has_unfinished():
        pairs = [s for s in eng.scheduler.running if s.uncond is not None]
        if len(pairs) == 8:
            saw_pairs = True
            prefix = eng.scheduler.uncond_prefix.block_table
            for s in pairs:  # every unconditional row of both prompts reads the one prefix
                full = (s.cond.image_start - 1) // bs
                assert full >= 1 and s.uncond.block_table[:full] == prefix[:full]
        done += eng.step()
    assert saw_pairs and sorted(o.request_id for o in done) == sorted(rids)
    assert bm.num_used_blocks == 0 and eng.scheduler.uncond_prefix is None
    assert eng.peak_used_blocks < 2 * 8 * math.ceil((max(lens) + 6 + 16) / bs)  # well below unshared rows


@pytest.mark.parametrize("merge_lora,fuse", [(None, True), (False, False)])
def test_lora_weight_updates_reach_the_next_rollout(merge_lora, fuse):
    """The engine runs the policy's own (peft-wrapped) modules, LoRA merged into the engine's weight buffers
    (fp32's default) or applied inline: changing LoRA weights in place changes the next greedy rollout, which then
    equals transformers' generate on the same adapted model."""
    peft = pytest.importorskip("peft")
    bundle = build_preset("tiny", image_size=64, seed=1)
    pm = peft.get_peft_model(bundle.model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"))
    policy = dataclasses.replace(bundle, model=pm)
    eng = LLMEngine(policy, EngineConfig(num_kv_blocks=300, block_size=8, merge_lora=merge_lora,
                                         fuse_projections=fuse))
    buffers = {k: v.data_ptr() for k, v in eng.runner.lora_buffers.items()}
    # Per layer: q/k/v fused and o, a merged weight each; or q, k, v and o, a shrink and an expand each.
    assert len(buffers) == (2 if merge_lora is None else 8) * len(eng.runner.layers)
    params = SamplingParams(n=1, text_temperature=0, image_temperature=0, max_reasoning_tokens=6,
                            decode_images=False)

    def rollout():
        [g] = eng.generate(PROMPTS[:1], params, use_tqdm=False)
        return g.samples[0].reasoning_ids, g.samples[0].image_tokens.tolist()

    before = rollout()
    lora = [p for name, p in pm.named_parameters() if "lora_B" in name]
    g = torch.Generator().manual_seed(0)
    for p in lora:
        p.grad = torch.randn(p.shape, generator=g)
    torch.optim.SGD(lora, lr=0.5).step()  # an optimizer step, in place on the policy's parameters
    pm.train()  # the engine puts the model in eval mode for the rollout and restores it after
    after = rollout()
    assert pm.training and after != before
    assert {k: v.data_ptr() for k, v in eng.runner.lora_buffers.items()} == buffers  # refreshed in place
    [[ref]] = ReferenceGenerator(policy).generate(PROMPTS[:1], n=1, text_temperature=0, image_temperature=0,
                                                  max_reasoning_tokens=6, decode_images=False)
    assert after == (ref.reasoning_ids, ref.image_tokens.tolist())
    pm.merge_adapter()  # LoRA merged into the base weights in place
    assert rollout() == after
    pm.unmerge_adapter()
    policy.model = pm.merge_and_unload()  # new modules: the engine rebinds before its next rollout
    assert rollout() == after


def test_fused_projections_rehome_the_parameters_once_and_keep_them_trainable(tmp_path):
    """q/k/v and gate/up run as one matmul each, on one tensor per group that the model's own parameters become
    views of: the same `Parameter` objects and values, stacked at the first bind (inside inference mode too, and
    still trainable after), found stacked at the next without a copy; an optimizer step in place reaches the fused
    matmul; transformers saves and reloads the model."""
    bundle = build_preset("tiny", image_size=64, seed=5)
    model = bundle.model
    layer = model.model.language_model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    groups = [[attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], [mlp.gate_proj.weight, mlp.up_proj.weight]]
    attn.k_proj.weight.data = attn.k_proj.weight.data.clone()  # not adjacent to q's rows, wherever it was
    values = [[p.detach().clone() for p in group] for group in groups]
    objects = [[id(p) for p in group] for group in groups]
    pointers = [p.data_ptr() for p in model.parameters()]
    runner = LLMEngine(bundle, EngineConfig(num_kv_blocks=8)).runner
    assert not runner.fuse_projections and runner.cascade  # a CPU's defaults
    assert [p.data_ptr() for p in model.parameters()] == pointers  # unfused: the model is left alone
    with torch.inference_mode():
        eng = LLMEngine(bundle, EngineConfig(num_kv_blocks=64, fuse_projections=True))

    def adjacent(group):
        return all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(group, group[1:]))

    for group, before, ids in zip(groups, values, objects):
        assert adjacent(group) and [id(p) for p in group] == ids
        assert all(torch.equal(p, v) and p.is_leaf and p.requires_grad and not p.is_inference()
                   for p, v in zip(group, before))
    pointers = [p.data_ptr() for p in model.parameters()]
    eng.runner.bind(model)
    assert [p.data_ptr() for p in model.parameters()] == pointers  # stacked already: nothing moved or copied
    loss = model.model.language_model(input_ids=torch.tensor([[1, 5, 9, 4]])).last_hidden_state.square().mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=10.0).step()  # in place, through the views
    assert not torch.equal(attn.k_proj.weight, values[0][1])
    x = torch.randn(5, attn.q_proj.in_features)
    with torch.no_grad():
        f = eng.runner.forwards[1]
        torch.testing.assert_close(torch.cat(f.qkv(x), -1), torch.cat([attn.q_proj(x), attn.k_proj(x),
                                                                        attn.v_proj(x)], -1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f.mlp(x), mlp(x), rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    for (name, p), q in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_projection_stacks_plain_linears_and_declines_what_it_cannot_stack():
    """One matmul for bias-free linears of one input (odd widths), equal to their outputs side by side; None
    (the caller runs them one by one) for biases, mixed dtypes, or weights that are not plain parameters."""
    torch.manual_seed(0)
    a, b, c = (torch.nn.Linear(5, w, bias=False) for w in (3, 1, 4))
    x = torch.randn(2, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(projection((a, b, c))(x), torch.cat([a(x), b(x), c(x)], -1), rtol=1e-6, atol=1e-6)
    assert projection((a, torch.nn.Linear(5, 2))) is None  # a bias
    assert projection((a, torch.nn.Linear(5, 2, bias=False).double())) is None
    assert stacked([a.weight.detach().clone(), b.weight.detach().clone()]) is None  # not parameters: never re-homed
    assert stacked([a.weight, torch.nn.Parameter(torch.randn(2, 4))]) is None  # other columns


@pytest.mark.parametrize("merge_lora", [True, False])
def test_lora_in_fused_projections_equals_the_modules(merge_lora):
    """Two adapters of different ranks active on some of q/k/v and gate/up (not on all): the fused projections,
    merged or inline (one shrink, one block-diagonal expand), equal the peft modules' own outputs."""
    peft = pytest.importorskip("peft")
    bundle = build_preset("tiny", image_size=64, seed=4)
    pm = peft.get_peft_model(bundle.model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)"))
    pm.add_adapter("two", peft.LoraConfig(r=3, lora_alpha=9, target_modules=r".*language_model.*\.(q_proj|k_proj)"))
    pm.base_model.set_adapter(["default", "two"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.eval()
    eng = LLMEngine(dataclasses.replace(bundle, model=pm), EngineConfig(num_kv_blocks=8, merge_lora=merge_lora,
                                                                       fuse_projections=True))
    x = torch.randn(5, bundle.model.config.text_config.hidden_size, generator=g)
    with torch.no_grad():
        for layer, f in zip(eng.runner.layers, eng.runner.forwards):
            attn = layer.self_attn
            want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
            assert not torch.allclose(want, torch.cat([m.base_layer(x) for m in (attn.q_proj, attn.k_proj,
                                                                                  attn.v_proj)], -1))
            torch.testing.assert_close(torch.cat(f.qkv(x), -1), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(f.mlp(x), layer.mlp(x), rtol=1e-5, atol=1e-5)
    assert sorted({what for _, what in eng.runner.lora_buffers}) == (["merged"] if merge_lora else ["down", "up"])


def test_a_hook_on_one_projection_unfuses_its_group():
    """A forward hook on k_proj must run: that layer's q/k/v go back to three calls (the hook's effect shows),
    the other layers stay fused."""
    bundle = build_preset("tiny", image_size=64, seed=6)
    attn = bundle.model.model.language_model.layers[0].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, args, out: out * 2)
    eng = LLMEngine(bundle, EngineConfig(num_kv_blocks=8, fuse_projections=True))
    x = torch.randn(3, attn.q_proj.in_features)
    with torch.no_grad():
        q, k, v = eng.runner.forwards[0].qkv(x)
        assert torch.equal(k, 2 * torch.nn.functional.linear(x, attn.k_proj.weight))
        assert torch.equal(q, attn.q_proj(x))
    hook.remove()
    layer = eng.runner.layers[1].self_attn
    assert layer.k_proj.weight.data_ptr() == layer.q_proj.weight.data_ptr() + layer.q_proj.weight.nbytes


def test_lora_is_merged_by_default_only_in_fp32():
    """A 16-bit merged weight would round away LoRA deltas below its last bit: 16-bit policies apply LoRA
    inline (peft's fp32 adapters as 16-bit copies) unless `merge_lora=True` asks otherwise. Inline, a 16-bit LoRA
    projection is three ops where peft's forward is seven (each a kernel launch on a GPU), within bf16 rounding;
    so are q/k/v together, fused."""
    peft = pytest.importorskip("peft")
    for dtype, merge_lora, merged in ((torch.bfloat16, None, False), (torch.bfloat16, True, True),
                                      (torch.float32, None, True)):
        bundle = build_preset("tiny", image_size=64, seed=1, dtype=dtype)
        pm = peft.get_peft_model(bundle.model, peft.LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
        eng = LLMEngine(dataclasses.replace(bundle, model=pm), EngineConfig(num_kv_blocks=8, merge_lora=merge_lora))
        kinds = sorted({what for _, what in eng.runner.lora_buffers})
        assert kinds == (["merged"] if merged else ["down", "up"])
    bundle = build_preset("tiny", image_size=64, seed=1, dtype=torch.bfloat16)
    pm = peft.get_peft_model(bundle.model, peft.LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
    eng = LLMEngine(dataclasses.replace(bundle, model=pm), EngineConfig(num_kv_blocks=8, fuse_projections=True))
    attn = eng.runner.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.lora_B["default"].weight.normal_()
    eng.runner.bind(pm)
    x = torch.randn(3, attn.q_proj.in_features, dtype=torch.bfloat16)
    with torch.inference_mode(), _OpCounter() as ours:
        got = torch.cat(eng.runner.forwards[0].qkv(x), -1)
    with torch.inference_mode(), _OpCounter() as theirs:
        want = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    # q/k/v fused: one matmul, one shrink, one expand, where peft's q_proj alone runs seven ops.
    assert (ours.count, theirs.count) == (3 + 1, 7 + 2), (ours.ops, theirs.ops)  # + 1: the test's cat
    torch.testing.assert_close(got, torch.cat(want, -1), rtol=2e-2, atol=2e-2)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that write new memory (not views of their inputs): a CPU proxy for a GPU's kernel
    launches."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
            self.ops.append(func.overloadpacket.__name__)
        return out


def test_triton_backend_equals_torch_backend(tiny):
    """Our Triton paged kernels (compiled on a GPU, interpreted on CPU) behind the same engine give the same
    rollout; on a GPU both backends run there (Triton cannot read CPU tensors once compiled)."""
    if torch.cuda.is_available():
        tiny = build_preset("tiny", image_size=64, device="cuda")
    params = SamplingParams(n=2, max_reasoning_tokens=3, seed=1, decode_images=False)
    outs = [LLMEngine(tiny, EngineConfig(num_kv_blocks=100, block_size=16, attention_backend=backend))
            .generate(PROMPTS[1:], params, use_tqdm=False)[0] for backend in ("torch", "triton")]
    for a, b in zip(outs[0].samples, outs[1].samples):
        assert a.reasoning_ids == b.reasoning_ids and a.image_tokens.tolist() == b.image_tokens.tolist()
        torch.testing.assert_close(a.image_mixed_logprobs, b.image_mixed_logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cascade_attention_changes_no_token(tiny, backend, monkeypatch):
    """Shared prefixes attended once per run of rows (the default) against every row reading its own
    (`disable_cascade_attn`): the same tokens, log-probs to fp32 rounding. And the steps did share: the samples
    of a group their prompt, the unconditional rows their pad prefix, the two runs `shared_prefixes` finds."""
    from engine.model_runner import ModelRunner

    runs, windows = [], {}
    prepare = ModelRunner._prepare

    def spy(self, batch, first):
        steps = prepare(self, batch, first)
        if first == 0:  # a new window (a batch object's id may be an earlier one's)
            windows[id(batch)] = steps[0].meta.block_tables, steps[0].meta.shared
        tables, shared = windows[id(batch)]
        if first == 0 and shared is not None and batch.uncond_rows:
            runs.append({first for first, n in shared.tolist() if n})
        # a window's steps, chunk after chunk, share one block tables and one runs tensor: graph replays copy them
        # at its first step only
        assert all(s.meta.block_tables is tables and s.meta.shared is shared for s in steps)
        return steps

    monkeypatch.setattr(ModelRunner, "_prepare", spy)
    params = SamplingParams(n=3, max_reasoning_tokens=3, min_reasoning_tokens=3, seed=1, decode_images=False)
    on, off = (LLMEngine(tiny, EngineConfig(num_kv_blocks=400, block_size=4, attention_backend=backend,
                                            disable_cascade_attn=disable)).generate(PROMPTS[:1], params,
                                                                                    use_tqdm=False)
               for disable in (False, True))
    assert runs and all(r == {0, 3} for r in runs)  # cond rows 0-2 over the prompt, uncond rows 3-5 over the pads
    assert_same_rollouts(on, off, atol=1e-5)


def test_cascade_attention_through_preemption(tiny):
    """A pool too small for both groups: samples are preempted and recomputed, the workspace gathered again with
    new runs each time; tokens and log-probs still equal those of every row reading its own prefix (a Triton run
    of the same, 40 s under the interpreter, passed too)."""
    params = SamplingParams(n=3, max_reasoning_tokens=20, min_reasoning_tokens=20, seed=2, decode_images=False)
    outs = []
    for disable in (False, True):
        eng = LLMEngine(tiny, EngineConfig(num_kv_blocks=40, block_size=4, max_num_seqs=8,
                                           disable_cascade_attn=disable))
        outs.append(eng.generate(PROMPTS, params, use_tqdm=False))
        assert eng.scheduler.num_preemptions > 0
    assert_same_rollouts(*outs, atol=1e-5)


@pytest.mark.parametrize("skinny_matmul", [False, True])
def test_the_16_bit_gpu_layer_path_emulated_on_a_cpu(monkeypatch, skinny_matmul):
    """The layer math a GPU runs in 16 bits, on this CPU (Triton's interpreter, bf16): q/k/v and gate/up fused,
    the Triton RoPE on the fused output's strided slices storing k and v into the cache itself, the residual add
    inside each norm's kernel, SwiGLU's one-kernel gate, the Triton paged attention; and, where asked, the decode
    projections through `kernels.skinny_matmul` (the stacked weights too). A CFG rollout's log-probs (text,
    conditional and CFG-mixed image) stay within bf16 rounding of transformers' own bf16 forwards of the same
    tokens, and each kernel ran."""
    import engine.lean as lean_module
    import engine.model_runner as runner_module

    calls: dict[str, int] = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for module in (lean_module, runner_module):  # what a GPU decides for 16 bits, decided here for a CPU
        monkeypatch.setattr(module, "gpu_kernels", lambda weight: weight.dtype != torch.float32)
    for name in ("add_rms_norm", "silu_mul", "rms_norm"):
        monkeypatch.setattr(lean_module, name, counted(name, getattr(lean_module, name)))
    monkeypatch.setattr(runner_module, "rope_store", counted("rope", runner_module.rope_store))
    import kernels.paged_attention as attention_module
    decode = attention_module.paged_decode_attention

    def decode_spy(*args, rope=None, **kwargs):  # a decode step's attention rotates and stores itself
        calls["fused rope"] = calls.get("fused rope", 0) + (rope is not None)
        return decode(*args, rope=rope, **kwargs)

    monkeypatch.setattr(attention_module, "paged_decode_attention", decode_spy)
    import kernels.skinny_matmul as skinny_module
    monkeypatch.setattr(skinny_module, "skinny_matmul", counted("skinny", skinny_module.skinny_matmul))
    bundle = build_preset("tiny", image_size=64, dtype=torch.bfloat16, seed=4)
    eng = LLMEngine(bundle, EngineConfig(num_kv_blocks=100, block_size=16, attention_backend="triton",
                                         fuse_projections=True, skinny_matmul=skinny_matmul))
    assert eng.runner.fused_rope and eng.runner.rope_stores and eng.runner.fuse_projections
    params = SamplingParams(n=1, text_temperature=0, image_temperature=0, cfg_weight=3.0, max_reasoning_tokens=4,
                            min_reasoning_tokens=4, decode_images=False)
    [group] = eng.generate(PROMPTS[:1], params, use_tqdm=False)
    s = group.samples[0]
    layers = len(eng.runner.layers)
    forwards = calls["rope"] + calls["fused rope"]  # per layer: RoPE in the prefills, in the attention after
    assert forwards == calls["silu_mul"] and calls["add_rms_norm"] == (2 * layers - 1) * forwards // layers
    assert calls["fused rope"] >= layers * (4 + 16 - 1) and calls["rope"] >= layers  # every decode step, a prefill
    assert calls["rms_norm"] > forwards // layers  # the first input norm of every forward, the heads' norms
    assert (calls.get("skinny", 0) > 0) == skinny_matmul
    text, cond, mixed, _ = teacher_forced(bundle, s.prompt_ids, s.reasoning_ids, s.image_tokens, text_t=0,
                                          image_t=0, cfg=3.0)
    torch.testing.assert_close(s.text_logprobs, text, rtol=0, atol=0.1)
    torch.testing.assert_close(s.image_logprobs, cond, rtol=0, atol=0.1)
    torch.testing.assert_close(s.image_mixed_logprobs, mixed, rtol=0, atol=0.2)


def test_576_image_tokens_greedy_equals_reference(monkeypatch):
    """A whole image phase in one window, its step metadata built a chunk at a time while earlier steps run."""
    from engine.model_runner import METADATA_CHUNK, ModelRunner

    chunks = []
    prepare = ModelRunner._prepare
    monkeypatch.setattr(ModelRunner, "_prepare", lambda self, batch, first: chunks.append(first) or prepare(
        self, batch, first))
    bundle = build_preset("tiny")
    assert bundle.num_image_tokens == 576
    params = SamplingParams(n=2, text_temperature=0, image_temperature=0, max_reasoning_tokens=4,
                            decode_images=True)
    [group] = LLMEngine(bundle, EngineConfig(num_kv_blocks=300)).generate(PROMPTS[:1], params, use_tqdm=False)
    assert max(chunks) == 576 - METADATA_CHUNK  # the image window's last chunk (576 = 36 chunks of 16)
    [ref] = ReferenceGenerator(bundle).generate(PROMPTS[:1], n=1, text_temperature=0, image_temperature=0,
                                                max_reasoning_tokens=4, decode_images=False)
    for s in group.samples:
        assert s.reasoning_ids == ref[0].reasoning_ids
        assert s.image_tokens.tolist() == ref[0].image_tokens.tolist()
        assert s.image.size == (384, 384) and s.image_logprobs.shape == (576,)


def test_engine_errors_are_clear(tiny, engine):
    with pytest.raises(ValueError, match="can never fit"):
        LLMEngine(tiny, EngineConfig(num_kv_blocks=20, block_size=4)).generate(
            PROMPTS, SamplingParams(n=1, max_reasoning_tokens=50), use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate(PROMPTS[:1], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="list of strings"):
        engine.generate("a cat", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([" "], use_tqdm=False)
    with pytest.raises(ValueError, match="min_reasoning_tokens"):
        SamplingParams(max_reasoning_tokens=3, min_reasoning_tokens=4)
    # values float32/int64 sampling cannot honour: inf/NaN logits (garbage tokens) or an overflow mid-step
    for bad, match in ((dict(text_temperature=1e-40), "text_temperature"), (dict(image_temperature=1e300), "image"),
                       (dict(text_temperature=float("nan")), "text"), (dict(cfg_weight=1e39), "cfg_weight"),
                       (dict(cfg_weight=float("inf")), "cfg_weight"), (dict(top_k=2**63), "top_k")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    SamplingParams(text_temperature=1e-3, image_temperature=1e3, cfg_weight=1e3, top_k=2**63 - 1)  # the bounds
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLMEngine(tiny, EngineConfig(num_kv_blocks=10, attention_backend="flash_attn"))
    with pytest.raises(ValueError, match=r"enable_pdl needs a CUDA GPU of compute capability 9\.0.*on cpu"):
        LLMEngine(tiny, EngineConfig(num_kv_blocks=10, enable_pdl=True))
    # turned on between rollouts: refused at the next rollout's bind, before the runner changes anything
    engine.config.enable_pdl = True
    with pytest.raises(ValueError, match="enable_pdl"):
        engine.generate([PROMPTS[0]], SamplingParams(n=1, max_reasoning_tokens=2, decode_images=False),
                        use_tqdm=False)
    engine.config.enable_pdl = False
    assert not engine.runner.pdl
    with pytest.raises(TypeError, match="JanusBundle"):
        LLMEngine(tiny.model)
    assert not engine.has_unfinished()


def test_generate_refuses_a_busy_engine_and_aborts_its_requests_when_a_step_fails(engine, monkeypatch):
    one = SamplingParams(n=2, max_reasoning_tokens=3, decode_images=False)
    rid = engine.add_request(PROMPTS[0], one)
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate(PROMPTS[:1], one, use_tqdm=False)
    engine.abort(rid)
    calls, run = [], engine.runner.run

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return run(*args)

    monkeypatch.setattr(engine.runner, "run", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(PROMPTS, one, use_tqdm=False)
    assert not engine.has_unfinished() and engine.block_manager.num_used_blocks == 0
    assert len(engine.generate(PROMPTS, one, use_tqdm=False)) == 2


def test_generate_runs_in_eval_mode_and_records_the_peak_and_the_length_limit(tiny, monkeypatch):
    """The model runs in eval mode (LoRA dropout off) and gets its modes back; `peak_used_blocks` is the busiest
    step's; a request is refused exactly when its longest row passes `max_model_len`."""
    params = SamplingParams(n=1, max_reasoning_tokens=3, min_reasoning_tokens=3, seed=1, decode_images=False)
    early = dataclasses.replace(params, n=3, max_reasoning_tokens=1, min_reasoning_tokens=1)  # done first
    longest = len(tiny.encode_prompts(PROMPTS[:1], 3)[0]) + 3 + 1 + tiny.num_image_tokens
    eng = LLMEngine(tiny, EngineConfig(num_kv_blocks=200, block_size=4, max_model_len=longest))
    seen, run = [], eng.runner.run

    def spy(*args):
        seen.append((tiny.model.training, eng.block_manager.num_used_blocks))
        return run(*args)

    monkeypatch.setattr(eng.runner, "run", spy)
    modes = [m.training for m in tiny.model.modules()]
    tiny.model.train()
    try:
        eng.generate(PROMPTS[:1] * 2, [early, params], use_tqdm=False)
        assert all(m.training for m in tiny.model.modules())
    finally:
        for m, mode in zip(tiny.model.modules(), modes):
            m.training = mode
    assert seen and not any(training for training, _ in seen)
    assert eng.peak_used_blocks == max(used for _, used in seen) > seen[-1][1]
    assert eng.kv_bytes_used_peak == eng.peak_used_blocks * eng.runner.block_bytes
    with pytest.raises(ValueError, match=f"needs up to {longest + 1} positions"):
        eng.add_request(PROMPTS[0], dataclasses.replace(params, max_reasoning_tokens=4))
    assert not eng.has_unfinished()


def test_abort_frees_blocks(engine):
    rid = engine.add_request(PROMPTS[0], SamplingParams(n=4, max_reasoning_tokens=8, decode_images=False))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort(rid)
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()
    steps = engine.num_steps
    assert engine.step() == [] and engine.num_steps == steps  # nothing left to run: no empty batch to the model
    with pytest.raises(KeyError):
        engine.abort(rid)
    one = SamplingParams(n=1, max_reasoning_tokens=8, decode_images=False)
    taken = str(int(engine.add_request(PROMPTS[0], one)) + 1)
    assert engine.add_request(PROMPTS[0], one, request_id=taken) == taken
    auto = engine.add_request(PROMPTS[0], one)
    assert auto not in (taken, rid) and len(engine.scheduler.groups) == 3  # an automatic id skips a caller's
    for r in list(engine.scheduler.groups):
        engine.abort(r)


@pytest.mark.parametrize("built,cast", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_a_model_cast_since_the_engine_was_built_is_refused_clearly(built, cast):
    """The KV pool, RoPE tables and attention backend are made for the model's dtype when the engine is built. A
    model cast since used to run on them silently (bf16 -> fp32: bf16 K/V and RoPE, log-probs off by ~1e-3) or fail
    inside a matmul (fp32 -> bf16); the next rollout refuses it with a clear error, and runs once cast back."""
    bundle = build_preset("tiny", image_size=64, seed=1, dtype=built)
    eng = LLMEngine(bundle, EngineConfig(num_kv_blocks=64, block_size=4))
    params = SamplingParams(n=1, text_temperature=0, image_temperature=0, max_reasoning_tokens=2, decode_images=False)
    bundle.model.to(cast)
    with pytest.raises(RuntimeError, match="build a new LLMEngine"):
        eng.generate(PROMPTS[:1], params, use_tqdm=False)
    assert not eng.has_unfinished() and eng.block_manager.num_used_blocks == 0
    bundle.model.to(built)
    [g] = eng.generate(PROMPTS[:1], params, use_tqdm=False)
    assert g.samples[0].image_tokens.shape == (16,)


def test_rope_follows_the_rotary_buffers_of_the_model_as_it_is_now():
    """A cast to bf16 and back rounds the rotary module's `inv_freq` (a float buffer, cast with the weights): the
    model's RoPE is then the rounded one, and so must the engine's be at the next rollout (it tabulated RoPE once,
    at its construction). Log-probs == a teacher-forced forward of the model as it is now; q and k scaled up, so
    that attention is sharp enough for positions to show in them (a rollout on the stale RoPE was off by ~7e-3)."""
    bundle = build_preset("tiny", image_size=64, seed=1)
    with torch.no_grad():
        for layer in bundle.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    eng = LLMEngine(bundle, EngineConfig(num_kv_blocks=200, block_size=4))
    rotary = bundle.model.model.language_model.rotary_emb
    before = rotary.inv_freq.clone()
    bundle.model.to(torch.bfloat16).to(torch.float32)
    assert not torch.equal(rotary.inv_freq, before)
    params = SamplingParams(n=2, cfg_weight=3.0, max_reasoning_tokens=6, seed=4, decode_images=False)
    [g] = eng.generate(PROMPTS[:1], params, use_tqdm=False)
    for s in g.samples:
        text, cond, mixed, _ = teacher_forced(bundle, s.prompt_ids, s.reasoning_ids, s.image_tokens, text_t=1.0,
                                              image_t=1.0, cfg=3.0)
        torch.testing.assert_close(s.text_logprobs, text, rtol=0, atol=1e-4)
        torch.testing.assert_close(s.image_logprobs, cond, rtol=0, atol=1e-4)
        torch.testing.assert_close(s.image_mixed_logprobs, mixed, rtol=0, atol=1e-4)


def test_rebind_drops_graphs_when_a_hook_changes_what_a_module_runs():
    """`lean` bypasses a module only while it has no hooks, decided at each bind: a hook added (or removed) since
    the graphs were captured changes the forward, so the graphs (which replay the old one) must go; a rebind that
    changes nothing keeps them."""
    bundle = build_preset("tiny", image_size=64)
    runner = LLMEngine(bundle, EngineConfig(num_kv_blocks=8)).runner
    mlp = runner.layers[0].mlp
    sentinel = object()  # stands for a captured graph: bind only decides whether to drop them
    runner.graphs[1] = sentinel
    runner.bind(bundle.model)
    assert runner.graphs == {1: sentinel}
    handle = mlp.register_forward_hook(lambda module, args, out: out * 2)
    runner.bind(bundle.model)
    assert runner.forwards[0].mlp is mlp  # the module is called now, hook and all
    assert not runner.graphs
    runner.graphs[1] = sentinel
    handle.remove()
    runner.bind(bundle.model)
    assert not runner.graphs
    with torch.no_grad():
        x = torch.randn(3, mlp.gate_proj.in_features)
        torch.testing.assert_close(runner.forwards[0].mlp(x), mlp(x))
