"""The engine's GPU-only paths on a CUDA device: decode steps replayed from CUDA graphs (Triton backend), the fused
CUDA sampling kernel, cfg_weight 1 rows without an unconditional row in the same batch as guided ones. Skipped
without a GPU; the CPU suite covers the same logic through the torch backend.
"""
import warnings

import pytest
import torch
from test_scheduler import assert_same_rollouts
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from engine.config import EngineConfig
from engine.lean import add_norm, lean
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from gotr1.model import build_preset
from gotr1.reference import ReferenceGenerator
from kernels.cfg_sampling import cuda_extension_available
from kernels.rms_norm import add_rms_norm, rms_norm
from kernels.silu_mul import silu_mul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["a red cat on a blue table", "two green squares"]


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", image_size=64, device="cuda")


def _engine(tiny, **kw) -> LLMEngine:
    return LLMEngine(tiny, EngineConfig(num_kv_blocks=200, block_size=16, attention_backend="triton", **kw))


@pytest.mark.parametrize("skinny_matmul", [False, True])
def test_graphed_greedy_equals_reference_generator(tiny, skinny_matmul):
    engine = _engine(tiny, skinny_matmul=skinny_matmul)
    # a GPU's defaults: projections fused, every row reading its own prefix
    assert engine.runner.use_cuda_graphs and engine.runner.fuse_projections and not engine.runner.cascade
    params = SamplingParams(n=2, text_temperature=0, image_temperature=0, cfg_weight=5.0,
                            max_reasoning_tokens=6, decode_images=False)
    ours = engine.generate(PROMPTS, params, use_tqdm=False)
    assert engine.runner.graphs, "decode steps did not replay CUDA graphs"
    ref = ReferenceGenerator(tiny).generate(PROMPTS, n=2, text_temperature=0, image_temperature=0,
                                            cfg_weight=5.0, max_reasoning_tokens=6, decode_images=False)
    for group, ref_group in zip(ours, ref):
        for s, r in zip(group.samples, ref_group):
            assert s.reasoning_ids == r.reasoning_ids
            assert s.image_tokens.tolist() == r.image_tokens.tolist()


@pytest.mark.parametrize("num_scheduler_steps", [16, 1])
def test_graphs_equal_eager_when_sampling_mixed_guidance(tiny, num_scheduler_steps):
    """Seeded sampling with top-k/top-p, one guided and one unguided group in the same batch: CUDA graphs (with
    multi-step windows: tokens fed back on the device, step metadata sent without blocking) and eager single
    steps give the same tokens and log-probs."""
    guided = SamplingParams(n=3, text_temperature=0.9, image_temperature=1.0, top_k=40, top_p=0.9, cfg_weight=4.0,
                            max_reasoning_tokens=5, seed=3, decode_images=False)
    unguided = SamplingParams(n=2, cfg_weight=1.0, max_reasoning_tokens=5, seed=4, decode_images=False)
    outs = [_engine(tiny, enforce_eager=eager, num_scheduler_steps=steps).generate(PROMPTS, [guided, unguided],
                                                                                   use_tqdm=False)
            for eager, steps in ((False, num_scheduler_steps), (True, 1))]
    for ga, gb in zip(*outs):
        for a, b in zip(ga.samples, gb.samples):
            assert a.reasoning_ids == b.reasoning_ids and a.image_tokens.tolist() == b.image_tokens.tolist()
            torch.testing.assert_close(a.image_logprobs, b.image_logprobs, rtol=0, atol=1e-4)


def test_graphed_cascade_attention_equals_unshared(tiny, monkeypatch):
    """Under CUDA graphs (the run kernel captured, the runs written into the graph's buffer each replay): shared
    prefixes read once per run give the tokens and log-probs of every row reading its own, and runs were there
    (the group's samples over the prompt, the unconditional rows over the pad prefix)."""
    from engine.model_runner import ModelRunner

    runs = []
    prepare = ModelRunner._prepare

    def spy(self, batch, first):
        steps = prepare(self, batch, first)
        if first == 0 and steps[0].meta.shared is not None:
            runs.append(int((steps[0].meta.shared[:, 1] > 0).sum()))
        return steps

    monkeypatch.setattr(ModelRunner, "_prepare", spy)
    params = SamplingParams(n=3, text_temperature=0.9, image_temperature=1.0, cfg_weight=4.0, max_reasoning_tokens=24,
                            min_reasoning_tokens=24, seed=5, decode_images=False)
    outs = [_engine(tiny, disable_cascade_attn=off).generate(PROMPTS, params, use_tqdm=False) for off in (False, True)]
    assert max(runs) >= 6  # two groups' unconditional rows over the pad prefix at least
    assert_same_rollouts(*outs)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skinny_matmul", [False, True])
def test_graphed_programmatic_dependent_launch_changes_nothing_but_timing(dtype, skinny_matmul):
    """`enable_pdl` captures the decode-step kernels with programmatic dependent launch (in bf16 every norm, RoPE,
    SwiGLU and, with skinny_matmul, every projection is one): the same sampled tokens and log-probs as without."""
    bundle = build_preset("tiny", image_size=64, device="cuda", dtype=dtype, seed=6)
    params = SamplingParams(n=3, text_temperature=0.9, image_temperature=1.0, cfg_weight=4.0, max_reasoning_tokens=24,
                            seed=7, decode_images=False)
    engines = [_engine(bundle, enable_pdl=pdl, skinny_matmul=skinny_matmul) for pdl in (True, False)]
    outs = [engine.generate(PROMPTS, params, use_tqdm=False) for engine in engines]
    assert engines[0].runner.pdl and engines[0].runner.graphs
    assert_same_rollouts(*outs, atol=0)  # the same kernels in the same order: bit for bit


def test_lean_16_bit_norm_is_the_one_kernel_norm():
    norm = LlamaRMSNorm(2048, eps=1e-6).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    forward = lean(norm)
    assert forward.func is rms_norm
    x = torch.randn(32, 2048, device="cuda", dtype=torch.bfloat16) * 3
    with torch.no_grad():
        torch.testing.assert_close(forward(x).float(), norm(x).float(), rtol=2**-6, atol=1e-6)


def test_lean_16_bit_fused_mlp_and_residual_norms_run_one_kernel_each(monkeypatch):
    """bf16 on a GPU: the fused gate/up MLP gates through `silu_mul`, and a residual add + norm is
    `add_rms_norm`; both track the modules within bf16 rounding (the sum bit for bit)."""
    import engine.lean as lean_module

    bundle = build_preset("tiny", image_size=64, device="cuda", dtype=torch.bfloat16, seed=1)
    layer = bundle.model.model.language_model.layers[0]
    hidden = layer.mlp.gate_proj.in_features
    x, d = (torch.randn(32, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    calls = []
    monkeypatch.setattr(lean_module, "silu_mul", lambda t: calls.append(t.shape) or silu_mul(t))
    mlp = lean(layer.mlp, fuse=True)
    with torch.no_grad():
        got, want = mlp(x), layer.mlp(x)
    assert calls == [(32, 2 * layer.mlp.gate_proj.out_features)]
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-5, atol=1e-3)
    f = add_norm(layer.input_layernorm)
    assert f.func is add_rms_norm
    with torch.no_grad():
        s, y = f(x, d)
        assert torch.equal(s, x + d)
        torch.testing.assert_close(y.float(), layer.input_layernorm(x + d).float(), rtol=2**-6, atol=1e-6)


def test_bf16_fused_rope_and_norms_track_transformers():
    """bf16 decode steps through the one-kernel RoPE and norms (CUDA graphs): each step's log-probs stay within
    bf16 rounding of transformers' own bf16 forward of the same tokens, and greedy picks agree where the choice is
    clear."""
    bundle = build_preset("tiny", image_size=64, device="cuda", dtype=torch.bfloat16)
    engine = _engine(bundle)
    assert engine.runner.fused_rope
    params = SamplingParams(n=1, text_temperature=0, image_temperature=0, max_reasoning_tokens=8,
                            decode_images=False)
    [group] = engine.generate(PROMPTS[:1], params, use_tqdm=False)
    sample = group.samples[0]
    ids = torch.tensor([sample.prompt_ids + sample.reasoning_ids], device="cuda")
    with torch.no_grad():
        logits = bundle.model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1:-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, ids[0, len(sample.prompt_ids):, None])[:, 0]
    torch.testing.assert_close(sample.text_logprobs.cuda(), expected, rtol=0, atol=0.1)
    top2 = logits.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1] > 0.05).tolist()  # near-ties may flip under bf16 rounding differences
    if sample.boi_forced:
        clear[-1] = False
    picks = logits.argmax(-1).tolist()
    assert all(p == t for p, t, c in zip(picks, sample.reasoning_ids, clear) if c)


def test_a_decode_window_syncs_with_the_host_once(tiny):
    """Multi-step decode keeps the host ahead of the device: a 16-step window (graph replays, sampling, tokens fed
    back on the device, step metadata sent through pinned memory) makes exactly one synchronizing CUDA call, the
    read of its tokens at the end (torch's sync debug mode reports each one)."""
    if not cuda_extension_available():
        pytest.skip("the fused sampling extension did not build: the torch sampling path syncs by design")
    engine = _engine(tiny)
    params = SamplingParams(n=4, max_reasoning_tokens=40, min_reasoning_tokens=40, seed=0, decode_images=False)
    engine.generate(PROMPTS[:1], params, use_tqdm=False)  # warm-up: graphs captured, kernels compiled
    engine.add_request(PROMPTS[0], params)
    engine.step()  # the prompt's prefill (its layout checks sync; prefill is not graphed)
    steps = engine.num_steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert engine.num_steps - steps == 16
    # Only the reports of a call: torch also warns once that its sync debug mode is a prototype.
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs
    engine.abort(next(iter(engine.scheduler.groups)))


@pytest.mark.parametrize("merge_lora", [False, True])
def test_bf16_lora_policy_under_graphs_sees_each_update_without_recapture(merge_lora):
    """A bf16 policy with peft's fp32 adapters (inline by default: 16-bit copies of the factors; or merged): the
    graphs captured by the first rollout replay after an optimizer step, read the refreshed weights in place, and
    give the tokens of eager steps on the updated policy."""
    import peft

    bundle = build_preset("tiny", image_size=64, device="cuda", dtype=torch.bfloat16, seed=2)
    bundle.model = peft.get_peft_model(bundle.model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)"))
    _graphs_see_updates(bundle, "lora_B", lambda p: p.normal_(std=0.5), merge_lora=merge_lora)


def test_bf16_graphs_see_in_place_updates_of_the_fused_projection_weights():
    """Full fine-tuning: an in-place update of the q/k/v and gate/up parameters (views of the stacked weights the
    fused matmuls read) reaches the graphs captured before it, without recapture."""
    bundle = build_preset("tiny", image_size=64, device="cuda", dtype=torch.bfloat16, seed=3)
    _graphs_see_updates(bundle, "proj", lambda p: p.add_(torch.randn_like(p) * p.std()))


def _graphs_see_updates(bundle, names: str, update, **config) -> None:
    """Greedy rollouts of a graphed engine before and after `update(param)` runs in place on every parameter whose
    name contains `names`: the graphs are the ones captured before, and the tokens change and equal an eager
    engine's."""
    params = SamplingParams(n=2, text_temperature=0, image_temperature=0, max_reasoning_tokens=5,
                            decode_images=False)
    graphed, eager = _engine(bundle, **config), _engine(bundle, enforce_eager=True, **config)

    def tokens(engine):
        return [(s.reasoning_ids, s.image_tokens.tolist()) for g in engine.generate(PROMPTS, params, use_tqdm=False)
                for s in g.samples]

    before = tokens(graphed)
    graphs = {size: id(graph) for size, (graph, _) in graphed.runner.graphs.items()}
    assert graphs
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if names in name:
                update(p)
    after = tokens(graphed)
    assert {size: id(graph) for size, (graph, _) in graphed.runner.graphs.items()} == graphs  # no recapture
    assert after != before and after == tokens(eager)
