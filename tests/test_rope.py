"""The one-kernel RoPE against transformers' Llama `apply_rotary_pos_emb` at odd head counts and head dims:
bit-identical under the interpreter (16-bit results round after every op, as torch does), within an ulp of the
output dtype when compiled (the compiler may contract a multiply-add)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kernels.rope import rope, rope_reference, rope_store, rope_store_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tables(max_pos: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's cos/sin for positions 0..max_pos-1, in `dtype` as its rotary module returns them."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(max_pos).float()[:, None] * inv_freq
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 7), hq=st.integers(1, 5), hk=st.integers(1, 3), half=st.integers(1, 20),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_transformers(poison, gpu_rounding, n, hq, hk, half, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    dim = 2 * half
    g = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(n, hq, dim, generator=g)).to(DEVICE, dtype)
    k = (3 * torch.randn(n, hk, dim, generator=g)).to(DEVICE, dtype)
    positions = torch.randint(0, 500, (n,), generator=g).to(DEVICE)
    cos, sin = tables(500, dim, dtype)
    sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], 1)
    # transformers: [batch, heads, seq, dim] with cos/sin [batch, seq, dim]; one sequence of the n tokens.
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[positions][None],
                                      sin[positions][None])
    expected = q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)
    q_ref, k_ref = rope_reference(q, k, cos, sin_signed, positions)
    q_out, k_out = rope(q, k, cos, sin_signed, positions)
    assert torch.equal(q_ref, expected[0]) and torch.equal(k_ref, expected[1])
    if DEVICE.type == "cpu":
        assert torch.equal(q_out, expected[0]) and torch.equal(k_out, expected[1])
        return
    for x, got, want in ((q, q_out, expected[0]), (k, k_out, expected[1])):
        assert within_a_rounding_of_each_product(x, got, want, cos, sin_signed, positions)


def within_a_rounding_of_each_product(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor, cos: torch.Tensor,
                                      sin_signed: torch.Tensor, positions: torch.Tensor) -> bool:
    """Compiled: a product the compiler keeps unrounded moves the sum by up to a rounding of each product (a plain
    relative tolerance fails where the two products cancel)."""
    unit = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-24
    half = x.shape[-1] // 2
    c, s = cos[positions][:, None].float(), sin_signed[positions][:, None].float()
    products = (x.float() * c).abs() + (torch.cat([x[..., half:], x[..., :half]], -1).float() * s).abs()
    return bool(((got.float() - want.float()).abs() <= unit * (products + want.float().abs())).all())


def test_strided_inputs_and_empty():
    """Views of a fused projection (the engine's q/k come out of `view`s) and zero tokens."""
    qkv = torch.randn(4, 3 + 1, 8, device=DEVICE)
    q, k = qkv[:, :3], qkv[:, 3:]
    cos, sin = tables(16, 8, torch.float32)
    positions = torch.tensor([0, 5, 5, 15], device=DEVICE)
    for got, want in zip(rope(q, k, cos, sin, positions), rope_reference(q, k, cos, sin, positions)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [t.shape for t in rope(q[:0], k[:0], cos, sin, positions[:0])] == [(0, 3, 8), (0, 1, 8)]


def test_bad_inputs_raise():
    cos, sin = tables(16, 8, torch.float32)
    q, k, pos = torch.randn(2, 2, 8, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE), torch.zeros(2).long()
    pos = pos.to(DEVICE)
    with pytest.raises(ValueError, match="equal N and D"):
        rope(q, k[:1], cos, sin, pos)
    with pytest.raises(ValueError, match="tables must"):
        rope(q, k, cos[:, :6], sin[:, :6], pos)
    with pytest.raises(ValueError, match="positions must"):
        rope(q, k, cos, sin, pos.float())
    with pytest.raises(ValueError, match="share a dtype"):
        rope(q, k, cos.double(), sin.double(), pos)


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 7), hq=st.integers(1, 5), hk=st.integers(1, 3), half=st.integers(1, 12),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_rope_store_equals_rope_then_store(poison, gpu_rounding, n, hq, hk, half, bf16, seed):
    """RoPE with the KV store folded in: q as `rope` returns it (poisoned output), and the caches exactly as
    `rope` then the store leave them, padding (-1) and out-of-range slots skipped, other slots untouched."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    dim = 2 * half
    g = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(n, hq + 2 * hk, dim, generator=g)).to(DEVICE, dtype)  # a fused projection's slices
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]
    positions = torch.randint(0, 64, (n,), generator=g).to(DEVICE)
    cos, sin = tables(64, dim, dtype)
    sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], 1)
    blocks, block_size = 3, 4
    slots = torch.randperm(blocks * block_size, generator=g)[:n]
    slots[0] = -1  # a padding row
    if n > 1:
        slots[1] = blocks * block_size  # out of range: dropped
    slots = slots.to(DEVICE)
    start = torch.randn(2, blocks, block_size, hk, dim, generator=g).to(DEVICE, dtype)
    caches = [start.clone(), start.clone()]  # the reference's and the kernel's, alike before
    want_q = rope_store_reference(q, k, v, cos, sin_signed, positions, *caches[0], valid_slots(slots))
    got_q = rope_store(q, k, v, cos, sin_signed, positions, *caches[1], slots)
    assert torch.equal(caches[1][1], caches[0][1])  # values: copied unrotated
    if DEVICE.type == "cpu":
        assert torch.equal(got_q, want_q) and torch.equal(caches[1][0], caches[0][0])
        return
    assert within_a_rounding_of_each_product(q, got_q, want_q, cos, sin_signed, positions)
    stored = valid_slots(slots) >= 0
    rows = valid_slots(slots)[stored]
    got_k, want_k = (cache[0].view(-1, hk, dim) for cache in caches)
    assert within_a_rounding_of_each_product(k[stored], got_k[rows], want_k[rows], cos, sin_signed,
                                             positions[stored])
    untouched = torch.ones(len(got_k), dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(got_k[untouched], want_k[untouched])


def valid_slots(slots: torch.Tensor) -> torch.Tensor:
    """The reference raises on out-of-range slots where the kernel drops them: mark those -1 for it."""
    return torch.where(slots < 0, -1, torch.where(slots >= 12, -1, slots))


def test_rope_store_bad_inputs_raise():
    cos, sin = tables(16, 8, torch.float32)
    q, k = torch.randn(2, 2, 8, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE)
    cache = torch.zeros(2, 4, 1, 8, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="key rows"):
        rope_store(q, k, k, cos, sin, pos, torch.zeros(2, 4, 2, 8, device=DEVICE), torch.zeros(2, 4, 2, 8,
                                                                                              device=DEVICE), pos)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rope_store(q, k, k, cos, sin, pos, cache, cache.clone(), pos[:1])
    with pytest.raises(ValueError, match="caches must be contiguous"):
        rope_store(q, k, k, cos, sin, pos, cache.transpose(0, 1), cache.transpose(0, 1), pos)


def test_strided_positions_and_slots():
    """Positions and slots that are strided views (every other entry) are read by index, not as if contiguous."""
    qkv = torch.randn(4, 3 + 2, 8, device=DEVICE)
    q, k, v = qkv[:, :3], qkv[:, 3:4], qkv[:, 4:]
    cos, sin = tables(16, 8, torch.float32)
    wide = torch.tensor([0, 15, 5, 15, 9, 15, 2, 15], device=DEVICE)
    positions = wide[::2]
    for got, want in zip(rope(q, k, cos, sin, positions), rope_reference(q, k, cos, sin, positions.contiguous())):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    slots = torch.tensor([3, 0, -1, 0, 7, 0, 1, 0], device=DEVICE)[::2]
    caches = [torch.full((2, 2, 4, 1, 8), float("nan"), device=DEVICE) for _ in range(2)]
    want_q = rope_store_reference(q, k, v, cos, sin, positions.contiguous(), *caches[0], slots.contiguous())
    got_q = rope_store(q, k, v, cos, sin, positions, *caches[1], slots)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[1], caches[0], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_inputs_strided_along_head_dim_are_refused():
    """The kernel reads a q, k or v row as `head_dim` consecutive values: one strided along head_dim is refused,
    not read as if it were contiguous."""
    cos, sin = tables(16, 8, torch.float32)
    q, k = torch.randn(2, 2, 8, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE)
    cache = torch.zeros(2, 4, 1, 8, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.long, device=DEVICE)

    def strided(*shape):
        return torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE)[..., ::2]

    for bad_q, bad_k in ((strided(2, 2, 8), k), (q, strided(2, 1, 8))):
        with pytest.raises(ValueError, match="contiguous along head_dim"):
            rope(bad_q, bad_k, cos, sin, pos)
    with pytest.raises(ValueError, match="v contiguous along head_dim"):
        rope_store(q, k, strided(2, 1, 8), cos, sin, pos, cache, cache.clone(), pos)
