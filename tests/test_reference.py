import shutil

import pytest
import torch

from gotr1.model import build_preset
from gotr1.reference import ReferenceGenerator


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", image_size=64)


def test_reference_generates_chain_and_decoded_image(tiny):
    groups = ReferenceGenerator(tiny).generate(["a red circle", "two blue squares"], n=2, max_reasoning_tokens=12,
                                               seed=3)
    assert [len(g) for g in groups] == [2, 2]
    for group, prompt in zip(groups, ["a red circle", "two blue squares"]):
        for s in group:
            assert s.prompt == prompt
            assert s.reasoning_ids[-1] == tiny.boi_id and tiny.boi_id not in s.reasoning_ids[:-1]
            assert len(s.reasoning_ids) <= 13 and s.boi_forced == (len(s.reasoning_ids) == 13)
            assert s.image_tokens.shape == (16,) and 0 <= s.image_tokens.min() and s.image_tokens.max() < 1024
            assert s.image.size == (64, 64)
            assert s.reasoning_text == tiny.decode_text(s.reasoning_ids)


def test_reference_greedy_matches_transformers_generate(tiny):
    """The reference is transformers' own generate: greedy rows equal a hand-driven greedy loop's."""
    [[s]] = ReferenceGenerator(tiny).generate(["a cat"], n=1, text_temperature=0, image_temperature=0,
                                              max_reasoning_tokens=6, min_reasoning_tokens=6, decode_images=False)
    ids = torch.tensor([s.prompt_ids])
    for tok in s.reasoning_ids[:-1]:
        nxt = tiny.model(input_ids=ids).logits[0, -1].argmax().item()
        assert nxt == tok
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    assert s.boi_forced and len(s.reasoning_ids) == 7


def test_min_reasoning_tokens_fix_the_length(tiny):
    groups = ReferenceGenerator(tiny).generate(["a cat"], n=3, max_reasoning_tokens=9, min_reasoning_tokens=9,
                                               decode_images=False)
    assert [len(s.reasoning_ids) for s in groups[0]] == [10, 10, 10]


def test_reference_rejects_bad_settings(tiny):
    gen = ReferenceGenerator(tiny)
    with pytest.raises(ValueError, match="n must be"):
        gen.generate(["a"], n=0)
    with pytest.raises(ValueError, match="cfg_weight > 1"):
        gen.generate(["a"], n=1, cfg_weight=1.0, max_reasoning_tokens=2, decode_images=False)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_reference_samples_what_the_eager_one_does(tiny):
    """`compile=True` (static caches, `torch.compile`d decoding: the fastest transformers baseline) changes no
    token: greedy and seeded sampling equal the eager reference's; the shared language model is left as it was."""
    lm = tiny.model.model.language_model
    settings = dict(n=2, max_reasoning_tokens=5, min_reasoning_tokens=5, decode_images=False)
    fast = ReferenceGenerator(tiny, compile=True)
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    for extra in (dict(text_temperature=0, image_temperature=0), dict(seed=3)):
        want = ReferenceGenerator(tiny).generate(["a cat", "two dogs"], **settings, **extra)
        got = fast.generate(["a cat", "two dogs"], **settings, **extra)
        assert [[(s.reasoning_ids, s.image_tokens.tolist()) for s in g] for g in got] == \
            [[(s.reasoning_ids, s.image_tokens.tolist()) for s in g] for g in want]
    assert stats["unique_graphs"] >= graphs + 2  # the text decode and the image loop's model were compiled
    assert len(fast._caches) == 2  # one static cache per phase's shape, reused by the second call
    assert "forward" not in lm.__dict__


def test_reference_stops_at_boi_but_not_before_the_minimum():
    """A model that samples `<begin_of_image>` almost surely (an `lm_head` bias): every row stops at its first
    BOI, never before `min_reasoning_tokens` (generate bans BOI until then), and a row that stopped by itself is
    not marked forced."""
    bundle = build_preset("tiny", image_size=64)
    head = bundle.model.lm_head
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[bundle.boi_id] = 12.0
    [group] = ReferenceGenerator(bundle).generate(["a cat"], n=3, max_reasoning_tokens=8, min_reasoning_tokens=3,
                                                  seed=0, decode_images=False)
    for s in group:
        assert len(s.reasoning_ids) == 4 and s.reasoning_ids[-1] == bundle.boi_id and not s.boi_forced


def test_reference_image_follows_cfg_weight_and_top_k(tiny):
    """Greedy CFG image tokens are the argmax of `u + w (c - u)` over transformers' own forwards of the
    conditional sequence and its unconditional twin (every token but BOS and BOI a PAD) at the requested weight;
    top-k 1 sampling is greedy, in both phases."""
    gen = ReferenceGenerator(tiny)
    settings = dict(n=1, max_reasoning_tokens=4, min_reasoning_tokens=4, cfg_weight=2.0, decode_images=False)
    [[greedy]] = gen.generate(["a cat"], text_temperature=0, image_temperature=0, **settings)
    [[top1]] = gen.generate(["a cat"], top_k=1, seed=5, **settings)
    assert (top1.reasoning_ids, top1.image_tokens.tolist()) == (greedy.reasoning_ids, greedy.image_tokens.tolist())
    janus, image = tiny.model, greedy.image_tokens
    ids = greedy.prompt_ids + greedy.reasoning_ids
    uncond = [t if t in (tiny.bos_id, tiny.boi_id) else tiny.pad_id for t in ids]
    with torch.no_grad():
        c, u = (janus.model.generation_head(janus.model.language_model(inputs_embeds=torch.cat([
            janus.get_input_embeddings()(torch.tensor([row])),
            janus.prepare_embeddings_for_image_generation(image[None, :-1])], 1)).last_hidden_state[0, len(row) - 1:])
            for row in (ids, uncond))
    assert image.tolist() == (u + 2.0 * (c - u)).argmax(-1).tolist()
