"""The one-kernel RMSNorm against transformers' `LlamaRMSNorm` (fp32 tight, bf16 within two ulps), at odd sizes."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_reference,
    cpu_rms_norm_available,
    rms_norm,
    rms_norm_cpu,
    rms_norm_reference,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def case(rows: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, LlamaRMSNorm]:
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, hidden, generator=g)).to(DEVICE, dtype)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(hidden, generator=g))
    return x, norm.to(DEVICE, dtype)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 9), hidden=st.integers(1, 300), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_llama_rms_norm(gpu_rounding, rows, hidden, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, norm = case(rows, hidden, dtype, seed)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, norm.weight, norm.variance_epsilon, out=out)
    with torch.no_grad():
        expected = norm(x)
    assert torch.equal(rms_norm_reference(x, norm.weight, norm.variance_epsilon), expected)
    # bf16: the fp32 sum's order may move the pre-weight rounding by an ulp, which the weight product can take to two.
    tol = dict(rtol=2**-6, atol=1e-6) if bf16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.float(), expected.float(), **tol)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 9), hidden=st.integers(1, 300), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_add_then_norm_equals_the_residual_add_and_llama_rms_norm(gpu_rounding, poison, rows, hidden, bf16, seed):
    """The sum is torch's add to the bit (its outputs are poisoned: every element must be written); the norm of
    it within the band of `rms_norm`."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, norm = case(rows, hidden, dtype, seed)
    residual, _ = case(rows, hidden, dtype, seed + 1)
    total, out = add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    want_total, want = add_rms_norm_reference(x, residual, norm.weight, norm.variance_epsilon)
    with torch.no_grad():
        assert torch.equal(want, norm(x + residual))
    assert torch.equal(total, want_total)
    tol = dict(rtol=2**-6, atol=1e-6) if bf16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.float(), want.float(), **tol)


def test_add_rms_norm_bad_inputs_raise():
    x, norm = case(2, 8, torch.float32)
    with pytest.raises(ValueError, match="residual must match"):
        add_rms_norm(x, x[:1], norm.weight, 1e-5)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        add_rms_norm(x[:, :2], x[:2, :2].t(), norm.weight[:2], 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, x, norm.weight[:4], 1e-5)


def test_leading_dims_and_empty():
    x, norm = case(6, 40, torch.float32)
    x3 = x.view(2, 3, 40)
    torch.testing.assert_close(rms_norm(x3, norm.weight, 1e-5), rms_norm_reference(x3, norm.weight, 1e-5),
                               rtol=1e-6, atol=1e-6)
    assert rms_norm(x[:0], norm.weight, 1e-5).shape == (0, 40)


def test_bad_inputs_raise():
    x, norm = case(2, 8, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, norm.weight[:4], 1e-5)
    with pytest.raises(ValueError, match="must match"):
        rms_norm(x, norm.weight.double(), 1e-5)
    with pytest.raises(ValueError, match="contiguous along"):
        rms_norm(x.t(), norm.weight[:2], 1e-5)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, norm.weight, 1e-5, out=torch.empty(3, 8, device=DEVICE))


@pytest.mark.skipif(not cpu_rms_norm_available(), reason="no C++ compiler: the engine keeps F.rms_norm")
@given(rows=st.integers(0, 9), hidden=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_cpu_path_equals_torch_within_ulps(rows, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(rows, hidden, generator=g)
    weight = 1 + 0.5 * torch.randn(hidden, generator=g)
    expected = torch.nn.functional.rms_norm(x, [hidden], weight, 1e-6)
    torch.testing.assert_close(rms_norm_cpu(x, weight, 1e-6), expected, rtol=5e-7, atol=1e-7)
    strided = torch.randn(rows, hidden + 3, generator=g)[:, :hidden]  # a row stride of its own
    torch.testing.assert_close(rms_norm_cpu(strided, weight, 1e-6),
                               torch.nn.functional.rms_norm(strided, [hidden], weight, 1e-6), rtol=5e-7, atol=1e-7)


@pytest.mark.skipif(not cpu_rms_norm_available(), reason="no C++ compiler")
@pytest.mark.parametrize("hidden", [7, 33, 300])
def test_cpu_path_equals_torch_bitwise_where_the_sum_is_exact(hidden):
    """Integer rows: every order of the sum of squares gives the same fp32 value, so the rest (rstd, then
    `(x * rstd) * weight` in torch's order) equals `F.rms_norm` to the bit; the ulp band of the test above would
    hide a reordered product."""
    g = torch.Generator().manual_seed(hidden)
    x = torch.randint(-20, 21, (5, hidden), generator=g).float()
    weight = 1 + 0.5 * torch.randn(hidden, generator=g)
    assert torch.equal(rms_norm_cpu(x, weight, 1e-6), torch.nn.functional.rms_norm(x, [hidden], weight, 1e-6))


@pytest.mark.skipif(not cpu_rms_norm_available(), reason="no C++ compiler")
def test_cpu_path_rejects_other_inputs():
    with pytest.raises(ValueError, match="fp32 CPU"):
        rms_norm_cpu(torch.randn(2, 8).double(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="contiguous along"):
        rms_norm_cpu(torch.randn(8, 2).t(), torch.ones(8), 1e-6)


@pytest.mark.skipif(not cpu_rms_norm_available(), reason="no C++ compiler")
def test_cpu_path_rejects_tensors_off_the_cpu():
    """Either tensor off the CPU raises (a chained `!=` let a CPU x with a non-CPU weight, or both off the CPU,
    through to the native call, which read the device pointers and crashed)."""
    for x, weight in ((torch.randn(2, 8), torch.ones(8, device="meta")),
                      (torch.randn(2, 8, device="meta"), torch.ones(8, device="meta")),
                      (torch.randn(2, 8, device="meta"), torch.ones(8))):
        with pytest.raises(ValueError, match="fp32 CPU"):
            rms_norm_cpu(x, weight, 1e-6)


@pytest.mark.usefixtures("gpu_rounding")
def test_bf16_kernels_round_where_transformers_does():
    """Where the sum of squares is exact in fp32 (integer rows: its order cannot matter) the kernels equal
    `LlamaRMSNorm` to the bit in bf16: the normed row rounded to bf16 before the weight multiply, and
    `add_rms_norm`'s sum rounded to bf16 before it is normed, as torch's add leaves it. (The bands of the tests
    above are wide enough to hide either rounding skipped.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(128, 256, (6, 48), generator=g).to(DEVICE, torch.bfloat16)  # x + residual: bf16 rounds it
    residual = torch.randint(1, 128, (6, 48), generator=g).to(DEVICE, torch.bfloat16)
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(48, generator=g))
        norm = norm.to(DEVICE, torch.bfloat16)
        want, want_sum = norm(x), x + residual
        want_normed = norm(want_sum)
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), want)
    total, normed = add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    assert torch.equal(total, want_sum) and torch.equal(normed, want_normed)


@pytest.mark.parametrize("native", [True, False])
def test_lean_runs_an_fp32_norm_with_its_own_eps(monkeypatch, native):
    """`engine.lean` runs an fp32 `LlamaRMSNorm` as `rms_norm_cpu` (or `F.rms_norm` where that cannot be built) with
    the module's own `variance_epsilon`, not Llama's default: rows of small norm, where eps dominates."""
    import engine.lean as lean_module

    if not native:
        monkeypatch.setattr(lean_module, "cpu_rms_norm_available", lambda: False)
    elif not cpu_rms_norm_available():
        pytest.skip("no C++ compiler")
    g = torch.Generator().manual_seed(3)
    x = 1e-3 * torch.randn(5, 70, generator=g)
    norm = LlamaRMSNorm(70, eps=1e-2)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(70, generator=g))
        f = lean_module.lean(norm)
        assert f.func is (rms_norm_cpu if native else torch.nn.functional.rms_norm)
        torch.testing.assert_close(f(x), norm(x), rtol=5e-7, atol=1e-9)
