"""The shapes VQ (transformers' JanusVQVAE) and the untrained shapes Janus built around it."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gotr1.chain import chat_prompt
from gotr1.model import load_model, save_bundle
from gotr1.rewards.protocol import RewardSample
from gotr1.shapes.base import build_shapes_base, sft_examples, shapes_tokenizer
from gotr1.shapes.judge import ShapesJudge
from gotr1.shapes.render import IMAGE_SIZE, render_scene
from gotr1.shapes.vq import (
    DEFAULT_VQ_PATH,
    VQTrainConfig,
    _quantise,
    decode_codes,
    encode_images,
    load_vq,
    load_vq_state,
    pixel_values,
    save_vq,
    spherical_kmeans,
    train_vq,
    vq_config,
)
from gotr1.shapes.world import CATEGORIES, gt_chain, sample_scene

SCENES = [sample_scene(random.Random(f"vq-test-{i}"), CATEGORIES[i % len(CATEGORIES)]) for i in range(10)]


@pytest.fixture(scope="module")
def vq():
    return load_vq()


@pytest.fixture(scope="module")
def bundle():
    return build_shapes_base(seed=0)


def test_config_keeps_the_janus_geometry():
    cfg = vq_config()
    assert 2 ** (len(cfg.channel_multiplier) - 1) == 8 and cfg.num_patches == 8
    assert cfg.base_channels % 32 == 0 and cfg.latent_channels % 32 == 0 and cfg.embed_dim == 8
    with pytest.raises(ValueError, match="power of two"):
        vq_config(patch_size=6)


def test_shipped_codebook_makes_transformers_encode_agree_with_cosine_quantisation(vq):
    weight = vq.quantize.embedding.weight
    assert torch.allclose(weight.norm(dim=-1), torch.ones(len(weight)), atol=1e-5)
    images = [render_scene(s) for s in SCENES[:4]]
    codes = encode_images(vq, images)
    with torch.no_grad():
        z = F.normalize(vq.quant_conv(vq.encoder(pixel_values(images, IMAGE_SIZE))).permute(0, 2, 3, 1), dim=-1)
        _, _, ids = _quantise(vq, z, 0.25)
    assert codes.shape == (4, 64) and torch.equal(codes.reshape(-1), ids)


def test_round_trip_keeps_what_the_judge_measures(vq):
    originals = [render_scene(s) for s in SCENES]
    recons = decode_codes(vq, encode_images(vq, originals))
    assert all(im.size == (64, 64) for im in recons)
    err = np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                   for a, b in zip(originals, recons)])
    assert err < 8.0  # out of 255 (shipped VQ: 4.5 on these scenes, 5.4 on 400)
    judge = ShapesJudge()
    verdicts = judge.verdicts([RewardSample.from_text(s.prompt, gt_chain(s), im) for s, im in zip(SCENES, recons)])
    assert np.mean([v.R_RI for v in verdicts]) > 0.9
    assert np.mean([v.R_PI for v in verdicts]) > 0.85
    assert sum(v.exact_match for v in verdicts) >= 7


def test_spherical_kmeans_finds_well_separated_directions():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    points = F.normalize(centres.repeat_interleave(200, 0) + 0.02 * torch.randn(800, 8, generator=g), dim=-1)
    found = spherical_kmeans(points, 4)
    assert torch.allclose(found.norm(dim=-1), torch.ones(4))
    assert (found @ centres.t()).max(0).values.min() > 0.99  # every true centre has a centroid on it


def test_training_step_save_and_load(tmp_path):
    vq, info = train_vq(VQTrainConfig(steps=3, batch_size=2, restart_every=1, warmup_fraction=0.34), log=lambda s: None)
    assert torch.allclose(vq.quantize.embedding.weight.norm(dim=-1), torch.ones(vq.config.num_embeddings))
    path = tmp_path / "vq.safetensors"
    save_vq(vq, path, info)
    state, config, stored = load_vq_state(path)
    assert stored["steps"] == 3 and config.num_embeddings == vq.config.num_embeddings
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())
    codes = encode_images(load_vq(path), [render_scene(SCENES[0])])
    assert torch.equal(codes, encode_images(vq, [render_scene(SCENES[0])]))
    with pytest.raises(FileNotFoundError, match="rebuild"):
        load_vq_state(tmp_path / "missing.safetensors")


def test_base_bundle_carries_the_vq_and_a_shapes_tokenizer(bundle, vq):
    assert bundle.image_size == 64 and bundle.num_image_tokens == 64
    for k, v in vq.state_dict().items():
        assert torch.equal(bundle.model.model.vqmodel.state_dict()[k], v), k
    assert torch.allclose(bundle.model.model.generation_embeddings.weight, vq.quantize.embedding.weight)
    chain = gt_chain(SCENES[4])
    ids = bundle.tokenizer(chain, add_special_tokens=False)["input_ids"]
    assert bundle.decode_text(ids) == chain
    assert set(bundle.got_tag_ids) <= set(ids)
    assert len(ids) < 120  # coordinates and words are single tokens
    assert shapes_tokenizer.__wrapped__().get_vocab() == bundle.tokenizer.get_vocab()  # deterministic
    prompt_ids = bundle.encode_prompts([SCENES[4].prompt], max_reasoning_tokens=600)[0]
    assert prompt_ids[0] == bundle.bos_id and len(prompt_ids) < 60


def test_sft_examples_are_the_vq_codes_of_the_ground_truth(bundle, vq):
    examples = sft_examples(SCENES[:3], bundle)
    assert [e.prompt for e in examples] == [s.prompt for s in SCENES[:3]]
    assert examples[1].chain == gt_chain(SCENES[1])
    codes = torch.stack([e.image_tokens for e in examples])
    assert torch.equal(codes, encode_images(vq, [render_scene(s) for s in SCENES[:3]]))
    images = bundle.decode_images(codes)
    assert [im.size for im in images] == [(64, 64)] * 3


def test_base_bundle_generates_and_round_trips_through_a_model_directory(bundle, tmp_path):
    enc = bundle.tokenizer([chat_prompt(SCENES[0].prompt) + "<begin_of_image>"], return_tensors="pt")
    tokens = bundle.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                   generation_mode="image", do_sample=False)
    assert tokens.shape == (1, 64) and int(tokens.max()) < bundle.model.config.vq_config.num_embeddings
    save_bundle(bundle, tmp_path)
    loaded = load_model(model_dir=tmp_path)
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    again = loaded.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                  generation_mode="image", do_sample=False)
    assert torch.equal(tokens, again)


def test_default_asset_exists():
    assert DEFAULT_VQ_PATH.is_file() and DEFAULT_VQ_PATH.stat().st_size < 5_000_000


# ------------------------------------------------------------------------------------------- mutation review
def test_quantise_is_the_vq_vae_loss_with_a_straight_through_estimator(vq):
    """VQ-VAE's loss (van den Oord et al. 2017): the codebook term at weight 1 and the commitment term at `beta`,
    so the encoder's gradient is `beta * 2 (z - e) / n` (transformers' JanusVQVAEVectorQuantizer puts beta on the
    codebook term instead: taming's legacy form); the codes pass the decoder's gradient straight to `z`."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(1, 2, 2, 8, generator=g), dim=-1).requires_grad_()
    zq, loss, ids = _quantise(vq, z, 0.25)
    codes = F.normalize(vq.quantize.embedding.weight, dim=-1)[ids].view(z.shape).detach()
    torch.testing.assert_close(zq.detach(), codes.permute(0, 3, 1, 2))
    assert loss.item() == pytest.approx(1.25 * ((codes - z.detach()) ** 2).mean().item())
    (encoder_grad,) = torch.autograd.grad(loss, z, retain_graph=True)
    torch.testing.assert_close(encoder_grad, 0.25 * 2 * (z - codes).detach() / z.numel())
    (straight,) = torch.autograd.grad((3 * zq).sum(), z)
    torch.testing.assert_close(straight, torch.full_like(z, 3.0))


def test_dead_codes_restart_at_the_worst_served_latents():
    from gotr1.shapes.vq import _farthest

    pool = torch.eye(4)
    codebook = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.0, 1.0, 0.1, 0.0]])  # best cosines: .995, .995, .0995, 0
    assert _farthest(pool, codebook, 2).tolist() == [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]


def test_spherical_kmeans_keeps_a_centroid_whose_cluster_empties():
    """Two distinct directions, three centroids: one cluster ends empty and keeps its (unit) centroid."""
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(50, 1)
    found = spherical_kmeans(points, 3)
    torch.testing.assert_close(found.norm(dim=-1), torch.ones(3))


def test_trained_codebook_rows_are_unit_vectors_whatever_the_learning_rate():
    """Adam moves the rows off the sphere (to 0.98..1.11 here): training ends by normalising them, on which
    transformers' Euclidean argmin == the training's cosine argmax rests."""
    vq, _ = train_vq(VQTrainConfig(steps=6, batch_size=2, restart_every=1, warmup_fraction=0.34, init_batches=1,
                                   learning_rate=0.5), log=lambda s: None)
    torch.testing.assert_close(vq.quantize.embedding.weight.norm(dim=-1), torch.ones(vq.config.num_embeddings))

