"""RMSNorm as transformers' `LlamaRMSNorm` computes it, in one kernel.

    y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype),   x32 = x in fp32

In 16 bits that is seven elementwise/reduction kernels in torch (upcast, square, mean, add, rsqrt, multiply,
downcast, weight multiply); a decode step of a 24-layer model runs 49 norms on a few dozen rows, so on a GPU those
launches cost more than the norms' bytes. Here one program per row does it: fp32 sum of squares, the 16-bit rounding
before the weight multiply (where transformers rounds), and the weight product rounded once, as torch rounds
`bf16 * bf16`. The sum's order differs from torch's, so results may differ by an ulp of the output dtype.
`add_rms_norm` also takes the residual add before the norm into the same kernel (the sum rounded as torch rounds
it, and returned too): a decoder layer's two adds and two norms are then two launches instead of four.

On a CPU, `rms_norm_cpu` does fp32 rows in one native call (csrc/rms_norm_cpu.cpp): a decode step's norm of a few
rows is otherwise half a dozen torch ops whose dispatch costs more than the arithmetic.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import triton
import triton.language as tl

from kernels.native import F32, I64, P, csrc_library
from kernels.pdl import pdl_launch, pdl_prologue


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm.forward`, op for op."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder's residual add and the norm after it: `s = x + residual`, `LlamaRMSNorm(s)`."""
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_out, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the sum rounded to the activations' dtype, as torch adds, stored, then normed
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_out + cols, s, mask=mask)
        x = s.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, 0) / n_cols + eps)
    y = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`rms_norm_reference` in one launch: x `[..., H]` (rows contiguous along H), weight `[H]` of x's dtype;
    `out` (contiguous, x's shape and dtype) lets callers supply the output buffer."""
    out = _output(x, weight, out)
    _launch(x.reshape(-1, x.shape[-1]), None, weight, out, None, eps)  # a view for [tokens, hidden] activations
    return out


def _output(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The checked output buffer of a norm of x (a new one when `out` is None)."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"weight must be [{x.shape[-1]}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}: they must match")
    if x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("x must be contiguous along its last dimension and weight contiguous")
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_reference` in one launch (vLLM's `fused_add_rms_norm`, out of place): the residual add that
    ends a decoder sublayer and the norm that starts the next, one kernel where torch runs the add and the norm's
    own. x and residual `[..., H]` of one shape and dtype, rows contiguous along H; returns (sum, normed), new."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    if residual.stride(-1) != 1:
        raise ValueError("residual must be contiguous along its last dimension")
    out = _output(x, weight, None)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1]), weight, out, total, eps)
    return total, out


def _launch(rows: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
            total: torch.Tensor | None, eps: float) -> None:
    if rows.shape[0]:
        block = triton.next_power_of_2(rows.shape[1])
        has_residual = residual is not None
        _rms_norm_kernel[(rows.shape[0],)](rows, residual if has_residual else rows, weight, out,
                                           total if has_residual else out, rows.stride(0),
                                           residual.stride(0) if has_residual else 0, rows.shape[1], rows.shape[1],
                                           eps, HAS_RESIDUAL=has_residual, BLOCK=block,
                                           num_warps=min(16, max(1, block // 256)), **pdl_launch())


@functools.cache  # a hot path: no re-hashing of the signatures per call
def _cpu_library() -> ctypes.CDLL | None:
    return csrc_library("rms_norm_cpu.cpp", (("gotr1_rms_norm", None, (P, I64, P, I64, I64, F32, P)),),
                        ("-ffp-contract=off",))


def cpu_rms_norm_available() -> bool:
    return _cpu_library() is not None


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, [H], weight, eps)` for fp32 CPU tensors in one native call (within 5e-7 relative: the sum's
    order differs); x `[..., H]` contiguous along H. Needs `cpu_rms_norm_available()`."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or {x.device.type, weight.device.type} != {"cpu"}:
        raise ValueError(f"rms_norm_cpu takes fp32 CPU tensors, got {x.dtype} on {x.device} and {weight.dtype}")
    if x.shape[-1:] != weight.shape or (x.numel() and x.stride(-1) != 1) or not weight.is_contiguous():
        raise ValueError(f"x must be [..., {weight.shape[0]}] contiguous along its last dimension, got "
                         f"{tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(x.shape, dtype=torch.float32)
    if rows.shape[0]:
        _cpu_library().gotr1_rms_norm(rows.data_ptr(), rows.stride(0), weight.data_ptr(), rows.shape[0],
                                      rows.shape[1], eps, out.data_ptr())
    return out
