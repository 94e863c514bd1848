"""The decode-step matmul against its fp32 reference and `F.linear`: fp32 tight, bf16 within an ulp of the
once-rounded result, at odd sizes, with and without bias, for every split of K (the partial sums and their reduce
by each tile's last program, `kernels.serial_split`: Triton's interpreter runs programs one after another, so the
race that its release/acquire order prevents shows only on a GPU, where these tests also run)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.serial_split import MAX_COUNTERS, counters
from kernels.skinny_matmul import MAX_ROWS, default_launch, linear, skinny_matmul, skinny_matmul_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def close(out: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: summation order only; 16 bits: one rounding of the fp32 result (the sums may straddle a tie)."""
    scale = expected.float().abs().max().clamp_min(1.0)
    tol = 2**-7 if out.dtype == torch.bfloat16 else 1e-5
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * scale)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 40), n=st.integers(1, 150), k=st.integers(1, 300), bias=st.booleans(), bf16=st.booleans(),
       split_k=st.sampled_from([1, 2, 3, 8]), block=st.sampled_from([(16, 32), (32, 64), (64, 128)]),
       seed=st.integers(0, 2**16))
def test_equals_reference(poison, gpu_rounding, m, n, k, bias, bf16, split_k, block, seed):
    x, w, b = case(m, n, k, torch.bfloat16 if bf16 else torch.float32, bias, seed)
    out = skinny_matmul(x, w, b, split_k=split_k, block_n=block[0], block_k=block[1])
    close(out, skinny_matmul_reference(x, w, b))


def test_split_k_counters_are_zero_after_every_launch(poison):
    """Each tile's last program sets its counter back: the next launch (or graph replay) starts from zero, the
    same tile ids again with another split."""
    for split_k in (2, 3, 8):
        x, w, b = case(4, 70, 200, torch.float32, bias=True, seed=split_k)
        close(skinny_matmul(x, w, b, split_k=split_k, block_n=16, block_k=16), skinny_matmul_reference(x, w, b))
        count = counters(DEVICE, 0)
        assert count.numel() == MAX_COUNTERS and not count.any()
    wide = torch.zeros(1, 200, device=DEVICE).expand(MAX_COUNTERS * 16 + 1, 200)  # no memory: one row, repeated
    with pytest.raises(ValueError, match="at most 65536 output tiles"):
        skinny_matmul(x, wide, split_k=2, block_n=16)


@pytest.mark.parametrize("m", [1, 16, 33, MAX_ROWS])
def test_fp32_equals_f_linear_at_default_launch(poison, m):
    """The engine's shapes at the default tiles (the decode-step case: few rows, K split to fill the device)."""
    x, w, b = case(m, 96, 700, torch.float32, bias=True)
    assert default_launch(m, 96, 700)["split_k"] > 1
    close(skinny_matmul(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("k,split_k,block_k", [(65, 2, 32), (129, 4, 32), (97, 3, 16)])
def test_split_shares_round_up(poison, k, split_k, block_k):
    """K just past what the splits' shares cover when rounded down: each split takes ceil(K / SPLIT_K) rounded up
    to BLOCK_K, so the last columns are summed (the property test above rarely draws such a K)."""
    x, w, b = case(3, 20, k, torch.float32, bias=True, seed=k)
    close(skinny_matmul(x, w, b, split_k=split_k, block_n=16, block_k=block_k), skinny_matmul_reference(x, w, b))


@pytest.mark.parametrize("split_k", [1, 2])
def test_weight_rows_with_a_stride_of_their_own(poison, split_k):
    """A weight that is the leading columns of a wider matrix (unit column stride, row stride past K) is read
    through its row stride, directly and through `linear`; NaN in the padding shows a read through a wrong one.
    `linear` sends a weight that is not contiguous along K to `F.linear` instead of raising."""
    x, w, b = case(5, 24, 40, torch.float32, bias=True)
    wide = torch.full((24, 47), float("nan"), device=DEVICE)
    wide[:, :40] = w
    view = wide[:, :40]
    assert view.stride() == (47, 1)
    want = skinny_matmul_reference(x, w, b)
    close(skinny_matmul(x, view, b, split_k=split_k, block_n=16, block_k=16), want)
    close(linear(x, view, b), want)
    transposed = w.T.contiguous().T
    assert transposed.stride(1) != 1
    close(linear(x, transposed, b), F.linear(x, w, b))


def test_strided_rows_and_empty_sizes():
    x, w, b = case(6, 20, 48, torch.float32, bias=True)
    wide = torch.randn(6, 64, device=DEVICE)
    wide[:, :48] = x
    close(skinny_matmul(wide[:, :48], w, b), skinny_matmul_reference(x, w, b))
    assert skinny_matmul(x[:0], w, b).shape == (0, 20)
    empty_k = skinny_matmul(x[:, :0], w[:, :0], b)
    assert torch.equal(empty_k, b.expand(6, 20)) and torch.equal(skinny_matmul(x[:, :0], w[:, :0]),
                                                                 torch.zeros(6, 20, device=DEVICE))


def test_bad_inputs_raise():
    x, w, b = case(4, 8, 16, torch.float32, bias=True)
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_matmul(torch.randn(MAX_ROWS + 1, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        skinny_matmul(x, w[:, :8])
    with pytest.raises(ValueError, match="bias must be"):
        skinny_matmul(x, w, b[:4])
    with pytest.raises(ValueError, match="one dtype and device"):
        skinny_matmul(x, w.double())
    with pytest.raises(ValueError, match="one dtype and device"):  # a bias would be read as x's dtype
        skinny_matmul(x, w, b.double())
    with pytest.raises(ValueError, match="contiguous along K"):
        skinny_matmul(x, w.T.contiguous().T)
