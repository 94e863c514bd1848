"""store_kvcache (Triton) against its torch reference and against an explicit per-slot loop.

The caches start as NaN, so a row written to the wrong slot, or not written, fails the exact comparison.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_paged_attention import DEVICE

from kernels.kv_cache import store_kvcache, store_kvcache_reference


def _case(n, num_blocks, block_size, hkv, d, dtype=torch.float32, key_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, 3, hkv, d, generator=g).to(DEVICE, key_dtype)
    key, value = qkv[:, 1], qkv[:, 2]  # strided views, as sliced out of a fused qkv projection
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots, generator=g)[:n]
    slots[torch.rand(n, generator=g) < 0.3] = -1
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    return key, value, k_cache.to(DEVICE), k_cache.clone().to(DEVICE), slots.to(DEVICE)


def _loop_oracle(key, value, k_cache, v_cache, slots):
    k, v = k_cache.clone(), v_cache.clone()
    bs = k.shape[1]
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            k[s // bs, s % bs] = key[i].to(k.dtype)
            v[s // bs, s % bs] = value[i].to(v.dtype)
    return k, v


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,num_blocks,block_size,hkv,d", [(7, 5, 4, 3, 24), (1, 1, 16, 1, 8), (33, 9, 4, 2, 40)])
def test_store_matches_reference_and_loop(n, num_blocks, block_size, hkv, d, slot_dtype):
    key, value, k_cache, v_cache, slots = _case(n, num_blocks, block_size, hkv, d)
    slots = slots.to(slot_dtype)
    expected_k, expected_v = _loop_oracle(key, value, k_cache, v_cache, slots)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    store_kvcache_reference(key, value, ref_k, ref_v, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    for got in (k_cache, ref_k):
        torch.testing.assert_close(got, expected_k, rtol=0, atol=0, equal_nan=True)
    for got in (v_cache, ref_v):
        torch.testing.assert_close(got, expected_v, rtol=0, atol=0, equal_nan=True)


def test_store_bf16_cache():
    key, value, k_cache, v_cache, slots = _case(11, 6, 4, 2, 16, dtype=torch.bfloat16, key_dtype=torch.bfloat16)
    expected_k, expected_v = _loop_oracle(key, value, k_cache, v_cache, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("gpu_rounding")
def test_store_casts_fp32_rows_into_bf16_cache():
    key, value, k_cache, v_cache, slots = _case(11, 6, 4, 2, 16, dtype=torch.bfloat16)
    expected_k, expected_v = _loop_oracle(key, value, k_cache, v_cache, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


def test_padding_only_and_empty_batches_leave_cache_untouched():
    key, value, k_cache, v_cache, slots = _case(4, 2, 4, 1, 8)
    before = k_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, torch.full((4,), -1, device=DEVICE))
    store_kvcache(key[:0], value[:0], k_cache, v_cache, slots[:0])
    torch.testing.assert_close(k_cache, before, rtol=0, atol=0, equal_nan=True)


def test_out_of_range_slot():
    key, value, k_cache, v_cache, _ = _case(2, 2, 4, 1, 8)
    slots = torch.tensor([8, 1], device=DEVICE)  # 8 == num_slots
    with pytest.raises(IndexError, match="slot 8 is outside the cache"):
        store_kvcache_reference(key, value, k_cache.clone(), v_cache.clone(), slots)
    store_kvcache(key, value, k_cache, v_cache, slots)  # the kernel drops it instead of writing out of bounds
    assert torch.equal(k_cache[0, 1], key[1]) and torch.isnan(k_cache).sum() == k_cache.numel() - 8


@pytest.mark.parametrize("bad", ["shape", "heads", "slots_dtype", "slots_len"])
def test_bad_inputs_raise(bad):
    key, value, k_cache, v_cache, slots = _case(3, 2, 4, 2, 8)
    if bad == "shape":
        value = value[:, :1]
    elif bad == "heads":
        k_cache = v_cache = torch.zeros(2, 4, 3, 8, device=DEVICE)
    elif bad == "slots_dtype":
        slots = slots.float()
    else:
        slots = slots[:2]
    with pytest.raises((ValueError, TypeError)):
        store_kvcache(key, value, k_cache, v_cache, slots)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 20), num_blocks=st.integers(1, 6), block_size=st.sampled_from([1, 4, 16]),
       hkv=st.integers(1, 3), d=st.integers(1, 33), seed=st.integers(0, 2**16))
def test_store_random_shapes(n, num_blocks, block_size, hkv, d, seed):
    n = min(n, num_blocks * block_size)
    key, value, k_cache, v_cache, slots = _case(n, num_blocks, block_size, hkv, d, seed=seed)
    expected_k, expected_v = _loop_oracle(key, value, k_cache, v_cache, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


def test_bench_store_reference(benchmark):
    key, value, k_cache, v_cache, slots = _case(64, 64, 16, 4, 64)
    benchmark(store_kvcache_reference, key, value, k_cache, v_cache, slots)


def test_strided_slot_mapping():
    """A strided slot mapping (every other entry of a wider tensor) is read by index, not as if contiguous."""
    key, value, k_cache, v_cache, slots = _case(6, 4, 4, 2, 8, seed=3)
    wide = torch.full((2 * slots.shape[0],), 15, dtype=slots.dtype, device=DEVICE)
    wide[::2] = slots
    store_kvcache(key, value, k_cache, v_cache, wide[::2])
    want_k, want_v = _loop_oracle(key, value, *_case(6, 4, 4, 2, 8, seed=3)[2:4], slots)
    assert torch.equal(k_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))


def test_padded_head_stride():
    """K/V rows whose heads are not back to back (a view of a wider tensor: head stride > head_dim) are read by
    their strides, as the loop oracle reads them."""
    key, value, k_cache, v_cache, slots = _case(5, 3, 4, 3, 8, seed=4)
    g = torch.Generator().manual_seed(5)
    key, value = (torch.randn(5, 3, 11, generator=g).to(DEVICE)[..., :8] for _ in range(2))
    want_k, want_v = _loop_oracle(key, value, k_cache, v_cache, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)


def test_tensors_on_two_devices_raise():
    """A slot mapping (or key) left on another device is refused before any kernel reads its pointer (the meta
    device stands in for a second device on a CPU-only machine)."""
    key, value, k_cache, v_cache, slots = _case(3, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="one device"):
        store_kvcache_reference(key, value, k_cache, v_cache, slots.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        store_kvcache(key.to("meta"), value, k_cache, v_cache, slots)
