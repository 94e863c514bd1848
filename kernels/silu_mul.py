"""SwiGLU's gate of a fused gate/up projection, in one kernel (vLLM's `silu_and_mul`).

    y = silu(x[..., :I]) * x[..., I:]        x = [..., 2I], the gate/up matmul's output

transformers' `LlamaMLP` computes `act_fn(gate) * up`: two elementwise kernels per layer, and with gate/up fused
into one matmul both read strided halves. Here one program per (row, column block) reads both halves once and
rounds where torch does: silu computed in fp32 and rounded to the activations' dtype, then the product of two
values of that dtype computed in fp32 and rounded once. `exp` may differ from torch's by an fp32 ulp, which the
rounding to 16 bits almost always hides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, pdl_prologue


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` on the halves of `x [..., 2I]`, op for op."""
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, *, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """`silu_mul_reference` in one launch: x `[..., 2I]` contiguous along its last dimension -> `[..., I]`
    (`out`, contiguous, lets callers supply it)."""
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension holds gate and up halves: it must be even, got {x.shape[-1]}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError("x must be contiguous along its last dimension")
    rows = x.reshape(-1, x.shape[-1])
    width = x.shape[-1] // 2
    shape = (*x.shape[:-1], width)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}")
    if rows.shape[0] and width:
        block = min(block, triton.next_power_of_2(width))
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](rows, out, rows.stride(0), width, width,
                                                                      BLOCK=block, num_warps=max(1, block // 256),
                                                                      **pdl_launch())
    return out
