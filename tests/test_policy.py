import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gotr1.model import build_preset
from gotr1.policy import Guidance, image_head_parts, make_batch, policy_hidden, token_logprobs


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", image_size=64)


def image_logits(janus, ids: list[int], image: torch.Tensor) -> torch.Tensor:
    """transformers' own image-generation logits of `image` after the text `ids` (one unpadded sequence)."""
    emb = torch.cat([janus.get_input_embeddings()(torch.tensor([ids])),
                     janus.prepare_embeddings_for_image_generation(image[None, :-1])], 1)
    hidden = janus.model.language_model(inputs_embeds=emb).last_hidden_state
    return janus.model.generation_head(hidden[0, len(ids) - 1:])


def test_teacher_forced_logprobs_equal_full_forward(tiny):
    """Variable prompt/reasoning lengths in one right-padded batch == each sample's own HF forward."""
    g = torch.Generator().manual_seed(0)
    prompts = tiny.encode_prompts(["a red circle", "two blue squares left of a green star"], 8)
    reasoning = [torch.randint(5, 500, (n,), generator=g).tolist() + [tiny.boi_id] for n in (7, 2)]
    images = torch.randint(0, 1024, (2, tiny.num_image_tokens), generator=g)
    batch = make_batch(prompts, reasoning, images, pad_id=tiny.pad_id)
    with torch.no_grad():
        text_h, img_h = policy_hidden(tiny.model, batch)
        text_lp = token_logprobs(text_h, tiny.model.lm_head, batch.reasoning_ids, chunk=5)
        _, vision_head = image_head_parts(tiny.model)
        img_lp = token_logprobs(img_h, vision_head, images, temperature=0.7)
        janus = tiny.model
        for i, (p, r) in enumerate(zip(prompts, reasoning)):
            ids = torch.tensor([p + r])
            ref = janus(input_ids=ids).logits[0].log_softmax(-1)
            expect = ref[len(p) - 1: len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(text_lp[i, : len(r)], expect, rtol=1e-5, atol=1e-5)
            emb = torch.cat([janus.get_input_embeddings()(ids),
                             janus.prepare_embeddings_for_image_generation(images[i: i + 1, :-1])], 1)
            h = janus.model.language_model(inputs_embeds=emb).last_hidden_state[0, len(p) + len(r) - 1:]
            logits = janus.model.generation_head(h) / 0.7
            expect = logits.log_softmax(-1).gather(-1, images[i][:, None]).squeeze(-1)
            torch.testing.assert_close(img_lp[i], expect, rtol=1e-5, atol=1e-5)
    assert batch.reasoning_mask.tolist() == [[1.0] * 8, [1.0] * 3 + [0.0] * 5]


def test_guided_image_logprobs_equal_cfg_mixed_full_forwards(tiny):
    """`Guidance`: image log-probs under `u + w (c - u)` of the conditional and unconditional logits of HF's own
    forwards (the unconditional row `[BOS, PAD ..., BOI]` as long as prompt + reasoning); text states unchanged."""
    g = torch.Generator().manual_seed(1)
    prompts = tiny.encode_prompts(["a red circle", "two blue squares left of a green star"], 8)
    reasoning = [torch.randint(5, 500, (n,), generator=g).tolist() + [tiny.boi_id] for n in (3, 6)]
    images = torch.randint(0, 1024, (2, tiny.num_image_tokens), generator=g)
    batch = make_batch(prompts, reasoning, images, pad_id=tiny.pad_id)
    guidance = Guidance(3.0, tiny.bos_id, tiny.pad_id, tiny.boi_id)
    janus = tiny.model
    _, vision_head = image_head_parts(janus)
    with torch.no_grad():
        text_h, cond_h = policy_hidden(janus, batch)
        guided_text_h, guided_h = policy_hidden(janus, batch, guidance)
        torch.testing.assert_close(guided_text_h, text_h, rtol=0, atol=1e-6)
        got = token_logprobs(guided_h, vision_head, images, temperature=0.7)
        assert (got - token_logprobs(cond_h, vision_head, images, temperature=0.7)).abs().max() > 0.1

        for i, (p, r) in enumerate(zip(prompts, reasoning)):
            c = image_logits(janus, p + r, images[i])
            u = image_logits(janus, [tiny.bos_id] + [tiny.pad_id] * (len(p) + len(r) - 2) + [tiny.boi_id], images[i])
            expect = ((u + 3.0 * (c - u)) / 0.7).log_softmax(-1).gather(-1, images[i][:, None]).squeeze(-1)
            torch.testing.assert_close(got[i], expect, rtol=1e-5, atol=1e-5)
        _, plain = policy_hidden(janus, batch, Guidance(1.0, tiny.bos_id, tiny.pad_id, tiny.boi_id))
        assert torch.equal(plain, cond_h)  # CFG 1 is the conditional distribution: no second forward


def test_make_batch_rejects_inconsistent_samples(tiny):
    with pytest.raises(ValueError, match="same samples"):
        make_batch([[1, 2]], [[3], [4]], torch.zeros(1, 16, dtype=torch.long), pad_id=0)
    with pytest.raises(ValueError, match="at least its <begin_of_image>"):
        make_batch([[1, 2]], [[]], torch.zeros(1, 16, dtype=torch.long), pad_id=0)


@settings(max_examples=4, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 2**16)), min_size=1, max_size=3),
       st.sampled_from([1.0, 2.5]))
def test_policy_logprobs_and_train_masks_equal_hf_forwards(tiny, samples, cfg_weight):
    """Any mix of prompt lengths (down to BOS alone) and reasoning lengths (down to BOI alone) in one batch, with
    per-token train masks and CFG on or off: log-probs equal each sample's own unpadded HF forward."""
    janus = tiny.model
    _, vision_head = image_head_parts(janus)
    prompts, reasoning, masks, images = [], [], [], []
    for n_prompt, n_reason, seed in samples:
        g = torch.Generator().manual_seed(seed)
        prompts.append([tiny.bos_id] + torch.randint(5, 500, (n_prompt,), generator=g).tolist())
        reasoning.append(torch.randint(5, 500, (n_reason,), generator=g).tolist() + [tiny.boi_id])
        masks.append((torch.rand(n_reason + 1, generator=g) < 0.7).tolist())
        images.append(torch.randint(0, 1024, (tiny.num_image_tokens,), generator=g))
    images = torch.stack(images)
    batch = make_batch(prompts, reasoning, images, pad_id=tiny.pad_id, train_mask=masks)
    with torch.no_grad():
        text_h, img_h = policy_hidden(janus, batch, Guidance(cfg_weight, tiny.bos_id, tiny.pad_id, tiny.boi_id))
        text_lp = token_logprobs(text_h, janus.lm_head, batch.reasoning_ids)
        img_lp = token_logprobs(img_h, vision_head, images)

        for i, (p, r) in enumerate(zip(prompts, reasoning)):
            ids = p + r
            logp = janus(input_ids=torch.tensor([ids])).logits[0, len(p) - 1: -1].log_softmax(-1)
            torch.testing.assert_close(text_lp[i, : len(r)], logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1),
                                       rtol=1e-5, atol=1e-5)
            assert batch.reasoning_mask[i].tolist() == [float(m) for m in masks[i]] + [0.0] * (
                batch.reasoning_ids.shape[1] - len(r))
            c = image_logits(janus, ids, images[i])
            if cfg_weight != 1:
                u = image_logits(janus, [tiny.bos_id] + [tiny.pad_id] * (len(ids) - 2) + [tiny.boi_id], images[i])
                c = u + cfg_weight * (c - u)
            torch.testing.assert_close(img_lp[i], c.log_softmax(-1).gather(-1, images[i][:, None]).squeeze(-1),
                                       rtol=1e-5, atol=1e-5)


def test_temperature_0_scores_the_untempered_logits():
    """Greedy rollouts (temperature 0) are scored on the plain logits, as the engine scores them: 0 means 1, not a
    division by zero (which made every log-prob NaN or -inf)."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden, targets = torch.randn(2, 3, 8, generator=g), torch.randint(0, 11, (2, 3), generator=g)
    with torch.no_grad():
        want = head(hidden).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close(token_logprobs(hidden, head, targets, temperature=0), want, rtol=1e-6, atol=1e-6)


def test_cfg_below_1_and_prompts_longer_than_the_image_beside_long_reasoning(tiny):
    """A CFG weight in [0, 1) (the engine samples it: mostly the unconditional logits) mixes too; and a batch whose
    longest prompt and longest reasoning are in different samples, by more than the image tokens that follow the
    text (the text targets' positions run past the padded text and must be clamped, not read out of range)."""
    janus = tiny.model
    _, vision_head = image_head_parts(janus)
    g = torch.Generator().manual_seed(2)
    prompts = [[tiny.bos_id], [tiny.bos_id] + torch.randint(5, 500, (30,), generator=g).tolist()]
    reasoning = [torch.randint(5, 500, (25,), generator=g).tolist() + [tiny.boi_id], [tiny.boi_id]]
    images = torch.randint(0, 1024, (2, tiny.num_image_tokens), generator=g)
    batch = make_batch(prompts, reasoning, images, pad_id=tiny.pad_id)
    with torch.no_grad():
        text_h, img_h = policy_hidden(janus, batch, Guidance(0.5, tiny.bos_id, tiny.pad_id, tiny.boi_id))
        text_lp = token_logprobs(text_h, janus.lm_head, batch.reasoning_ids)
        img_lp = token_logprobs(img_h, vision_head, images)
        for i, (p, r) in enumerate(zip(prompts, reasoning)):
            ids = p + r
            logp = janus(input_ids=torch.tensor([ids])).logits[0, len(p) - 1: -1].log_softmax(-1)
            torch.testing.assert_close(text_lp[i, :len(r)], logp.gather(-1, torch.tensor(r)[:, None])[:, 0],
                                       rtol=1e-5, atol=1e-5)
            c = image_logits(janus, ids, images[i])
            u = image_logits(janus, [tiny.bos_id] + [tiny.pad_id] * (len(ids) - 2) + [tiny.boi_id], images[i])
            mixed = (u + 0.5 * (c - u)).log_softmax(-1)
            torch.testing.assert_close(img_lp[i], mixed.gather(-1, images[i][:, None])[:, 0], rtol=1e-5, atol=1e-5)
