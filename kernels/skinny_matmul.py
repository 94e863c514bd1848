"""`x @ weight.T + bias` for the few rows of a decode step (at most 64), reading the weight once.

A decode step multiplies a few dozen activation rows by every projection of the model, so the weights are the
bytes that move. In the session-3 H200 profile of a Janus-Pro-1B-shaped rollout, cuBLAS's kernels for 16-32 rows
moved them at about 0.58 of copy bandwidth, and took 45% of the step's GPU time. Here one program owns a
`BLOCK_N x (K / SPLIT_K)` slab of the weight. It streams the slab in `BLOCK_K` tiles and multiplies the whole row
block (padded to 16 rows) against each tile on the matrix units, accumulating in fp32. With `SPLIT_K > 1` each
program writes its partial sums to a workspace, and the column tile's last program adds them in split order
(`kernels.serial_split`): deterministic, and no reduce kernel (a decode step has three split projections per
layer). The bias is added in fp32 and the result is rounded once to the input dtype.

Whether this beats cuBLAS is a GPU measurement (`python -m bench kernels --only skinny_matmul --scale gpu
--matmul-sweep`), not yet made. The engine uses it only when asked to (`EngineConfig.skinny_matmul`).
Under Triton's CPU interpreter, 16-bit tiles are upcast (the interpreter's bf16 arithmetic is unreliable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, pdl_prologue
from kernels.serial_split import counters, last_to_arrive, reset_count

MAX_ROWS = 64


def skinny_matmul_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 `x @ weight.T + bias`, rounded once to x's dtype."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, count_ptr, m, n, k, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    k_len = tl.cdiv(tl.cdiv(k, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_len
    k_end = tl.minimum(k_start + k_len, k)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K > 1:  # partial sums [SPLIT_K, m, n], fp32; the tile's last program to count itself in adds them
        part = part_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :]
        tl.store(part + split.to(tl.int64) * m * n, acc, mask=ok)
        if last_to_arrive(count_ptr, pid_n, SPLIT_K):
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):  # in split order, from L2 (".cg"): the other programs' writes
                acc += tl.load(part + s * m * n, mask=ok, other=0.0, cache_modifier=".cg")
            _finish(acc, b_ptr, out_ptr, rows, cols, col_ok, ok, stride_om, HAS_BIAS)
            reset_count(count_ptr, pid_n)
    else:
        _finish(acc, b_ptr, out_ptr, rows, cols, col_ok, ok, stride_om, HAS_BIAS)


@triton.jit
def _finish(acc, b_ptr, out_ptr, rows, cols, col_ok, ok, stride_om, HAS_BIAS: tl.constexpr):
    """`acc` (+ bias, in fp32) rounded once into the output tile."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=ok)


def default_launch(m: int, n: int, k: int) -> dict[str, int]:
    """Tile and split for an `m x k` by `k x n` product: enough programs to cover the device's SMs (splitting K
    when N alone gives too few), tiles big enough to keep several weight loads in flight."""
    block_n = 64
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < 128 and k // (split_k * 2) >= 256:
        split_k *= 2
    return dict(block_n=block_n, block_k=128, split_k=split_k, num_warps=4, num_stages=4)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """`skinny_matmul_reference` for x `[M <= 64, K]`, weight `[N, K]` (rows contiguous) and bias `[N]`, all one
    dtype on one device; the launch knobs default to `default_launch`."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_matmul takes at most {MAX_ROWS} rows, got {m}: use F.linear")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        raise ValueError(f"x, weight and bias must share one dtype and device, got "
                         f"{[(t.dtype, str(t.device)) for t in tensors]}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or (bias is not None and not bias.is_contiguous()):
        raise ValueError("x and weight must be contiguous along K, and bias contiguous")
    launch = default_launch(m, n, k)
    for name, value in (("block_n", block_n), ("block_k", block_k), ("split_k", split_k),
                        ("num_warps", num_warps), ("num_stages", num_stages)):
        if value is not None:
            launch[name] = value
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    split = max(1, min(launch["split_k"], triton.cdiv(k, launch["block_k"])))
    tiles = triton.cdiv(n, launch["block_n"])
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    count = counters(x.device, tiles) if split > 1 else out
    _matmul_kernel[(tiles, split)](
        x, weight, bias if bias is not None else x, out, part, count, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"], UPCAST=x.device.type == "cpu",
        # TF32 is exact on 16-bit values; fp32 operands need IEEE (cuBLAS's fp32 default)
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=launch["num_warps"], num_stages=launch["num_stages"], **pdl_launch(),
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with a decode step's input (2-D, at most `MAX_ROWS` rows) through `skinny_matmul`; anything else
    (a prefill, a strided weight) through `F.linear` itself."""
    if x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1:
        return skinny_matmul(x, weight, bias)
    return F.linear(x, weight, bias)
