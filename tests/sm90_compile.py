"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU, through the same wrappers the engine
and trainer call, at Janus-Pro-1B's decode shapes in bf16 (the GPU path; Triton's interpreter, which the CPU tests
use, neither type-checks a kernel as the compiler does nor lowers it to PTX). Nothing is launched: a stand-in
driver only names the target, and every launch becomes a compile. Prints each kernel's registers, stack and the
instructions in its loops (and how many of them touch local memory: spills), from `cuobjdump`, so a change that
grows a hot loop or makes it spill shows. A decode step's kernels compile a second time with programmatic dependent
launch on (`kernels.pdl`), and each line counts the `griddepcontrol` instructions in the kernel's PTX.

Run as a script (`TRITON_INTERPRET` must be 0 before triton is imported, hence a process of its own); the test
`test_sm90_compile.py` runs it. Exits 0 when every kernel compiled.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class Sm90Driver:
    """Names the target and a device; kernels compile for it and never load."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def usage(cubin: bytes) -> str:
    """Registers and stack from `cuobjdump -res-usage`; local loads/stores inside backward-branch loops."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", res)
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(t, 16), a) for a, op in code for t in re.findall(r"BRA (?:`\(\S+\) )?0x([0-9a-f]+)", op)
             if int(t, 16) < a]
    looped = [op for a, op in code if any(s <= a <= e for s, e in loops)]
    local = sum(1 for op in looped if re.search(r"\b(LDL|STL)", op))
    return (f"regs {regs.group(1)} stack {regs.group(2)} instructions in loops {len(looped)}, local {local}"
            if regs else res.strip())


def dependent_launch(ptx: str) -> str:
    """How many `griddepcontrol` instructions the PTX has, and whether the wait comes before every global memory
    access (the guarantee PDL's correctness rests on)."""
    wait = ptx.find("griddepcontrol.wait")
    access = min((i for i in (ptx.find(op) for op in ("ld.global", "st.global", "cp.async", "atom.global"))
                  if i >= 0), default=-1)
    first = "n/a" if wait < 0 else ("yes" if access < 0 or wait < access else "NO")
    return f"griddepcontrol {ptx.count('griddepcontrol')} wait first {first}"


def main() -> int:
    driver.set_active(Sm90Driver())
    compiled: list[tuple[str, str, object]] = []
    case = ""
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((case, self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only

    from kernels.advantages import group_advantages
    from kernels.grpo_loss import fused_grpo_loss
    from kernels.kv_cache import store_kvcache
    from kernels.paged_attention import RopeStore, paged_decode_attention, paged_prefill_attention, shared_prefixes
    from kernels.pdl import programmatic_dependent_launch
    from kernels.rms_norm import add_rms_norm, rms_norm
    from kernels.rope import rope_store
    from kernels.silu_mul import silu_mul
    from kernels.skinny_matmul import skinny_matmul

    bf16, rows, heads, dim, bs = torch.bfloat16, 32, 16, 128, 16
    q = torch.randn(rows, heads, dim, dtype=bf16)
    kv = torch.randn(2, 120, bs, heads, dim, dtype=bf16)
    table = torch.arange(rows * 3, dtype=torch.int32).view(rows, 3)
    ctx = torch.full((rows,), 40, dtype=torch.int32)
    table[1:16, :2] = table[0, :2]  # a run of 16 rows over 32 shared positions
    shared = torch.tensor(shared_prefixes(table.tolist(), [39] * rows, bs), dtype=torch.int32)
    gpu = dict(use_dot=True, upcast=False)  # what a GPU picks for 16 bits
    rope = RopeStore(q, q, torch.randn(64, dim, dtype=bf16), torch.randn(64, dim, dtype=bf16),
                     torch.full((rows,), 39), torch.arange(rows))
    cases = {
        "decode": lambda: paged_decode_attention(q, kv[0], kv[1], table, ctx, scale=0.1, num_splits=1, **gpu),
        "decode, splits": lambda: paged_decode_attention(q, kv[0], kv[1], table, ctx, scale=0.1, num_splits=4, **gpu),
        "decode, cascade": lambda: paged_decode_attention(q, kv[0], kv[1], table, ctx, scale=0.1, num_splits=1,
                                                          shared=shared, shared_splits=9, **gpu),
        "decode, cascade + splits": lambda: paged_decode_attention(q, kv[0], kv[1], table, ctx, scale=0.1,
                                                                   num_splits=3, shared=shared, shared_splits=4, **gpu),
        "decode, rope + store": lambda: paged_decode_attention(q, kv[0], kv[1], table, ctx, scale=0.1, num_splits=3,
                                                               rope=rope, **gpu),
        "decode, cascade + rope + store": lambda: paged_decode_attention(
            q, kv[0], kv[1], table, ctx, scale=0.1, num_splits=1, shared=shared, shared_splits=4, rope=rope, **gpu),
        "prefill": lambda: paged_prefill_attention(q, kv[0], kv[1], table[:2], torch.tensor([0, 16, 32]),
                                                   torch.tensor([16, 40], dtype=torch.int32), scale=0.1),
        "kv store": lambda: store_kvcache(q, q, kv[0], kv[1], torch.arange(rows)),
        "rope + store": lambda: rope_store(q, q, q, torch.randn(64, dim, dtype=bf16), torch.randn(64, dim, dtype=bf16),
                                           torch.arange(rows), kv[0], kv[1], torch.arange(rows)),
        "rms norm": lambda: rms_norm(torch.randn(rows, 2048, dtype=bf16), torch.randn(2048, dtype=bf16), 1e-6),
        "add + rms norm": lambda: add_rms_norm(*torch.randn(2, rows, 2048, dtype=bf16), torch.randn(2048, dtype=bf16),
                                               1e-6),
        "silu mul": lambda: silu_mul(torch.randn(rows, 2 * 5632, dtype=bf16)),
        # meta tensors: the wrapper reads the device type only to pick 16-bit operands off a CPU
        "skinny matmul": lambda: skinny_matmul(torch.empty(rows, 2048, dtype=bf16, device="meta"),
                                               torch.empty(6144, 2048, dtype=bf16, device="meta")),
        "group advantages": lambda: group_advantages(torch.rand(64, 4), 16, token_counts=torch.full((64,), 5)),
        "grpo loss": lambda: fused_grpo_loss(
            torch.randn(2, 8, 64, dtype=bf16, requires_grad=True), torch.randn(512, 64, dtype=bf16),
            torch.randint(0, 512, (2, 8)), None, torch.randn(2, 8), torch.randn(2), torch.ones(2, 8, dtype=torch.bool),
            beta=0.04, epsilon=0.2, backend="triton")[0].backward(),
    }
    # A decode step's kernels once more as `EngineConfig.enable_pdl` launches them (the model runner's context).
    decode_step = ("decode", "decode, splits", "decode, cascade", "decode, cascade + splits", "decode, rope + store",
                   "decode, cascade + rope + store", "rope + store",
                   "rms norm", "add + rms norm", "silu mul", "skinny matmul")
    runs = [(name, cases[name], False) for name in cases] + [(f"PDL {name}", cases[name], True) for name in decode_step]
    failed = []
    for case, run, pdl in runs:
        try:
            with programmatic_dependent_launch(pdl):
                run()
        except Exception as e:  # report every case, then fail
            failed.append(case)
            print(f"FAIL {case}: {type(e).__name__}: {e}")
    for name, kernel_name, kernel in compiled:
        print(f"{name}\t{kernel_name}\t{usage(kernel.asm['cubin'])}, {dependent_launch(kernel.asm['ptx'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
