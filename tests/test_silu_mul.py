"""The one-kernel SwiGLU gate against `F.silu(gate) * up` (fp32 tight, bf16 within an ulp), at odd sizes."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.silu_mul import silu_mul, silu_mul_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def case(rows: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(rows, 2 * width, generator=g)).to(DEVICE, dtype)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 9), width=st.integers(1, 300), bf16=st.booleans(), block=st.sampled_from([16, 1024]),
       seed=st.integers(0, 2**16))
def test_equals_silu_times_up(gpu_rounding, rows, width, bf16, block, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = case(rows, width, dtype, seed)
    out = torch.full((rows, width), float("nan"), dtype=dtype, device=DEVICE)  # poisoned: every element written
    silu_mul(x, out=out, block=block)
    expected = silu_mul_reference(x)
    assert torch.equal(expected, torch.nn.functional.silu(x[:, :width]) * x[:, width:])
    # bf16: an fp32 ulp of exp may move silu's rounding by one ulp, which the product keeps.
    tol = dict(rtol=2**-7, atol=1e-6) if bf16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.float(), expected.float(), **tol)


def test_strided_rows_leading_dims_and_empty():
    x = case(12, 24, torch.float32)
    rows = x[::2]  # a row stride of its own
    torch.testing.assert_close(silu_mul(rows), silu_mul_reference(rows), rtol=1e-6, atol=1e-6)
    x3 = x.view(3, 4, 48)
    got = silu_mul(x3)
    assert got.shape == (3, 4, 24)
    torch.testing.assert_close(got, silu_mul_reference(x3), rtol=1e-6, atol=1e-6)
    assert silu_mul(x[:0]).shape == (0, 24)


def test_bad_inputs_raise():
    x = case(2, 8, torch.float32)
    with pytest.raises(ValueError, match="even"):
        silu_mul(x[:, :15])
    with pytest.raises(ValueError, match="contiguous along"):
        silu_mul(x.t())
    with pytest.raises(ValueError, match="out must be"):
        silu_mul(x, out=torch.empty(2, 16, device=DEVICE))
