"""Serial split reduction (CUTLASS's "serial split-K"): the last program of a split finishes the sum, no second
kernel.

A kernel that splits a reduction over several programs (the K of a decode step's matmul, the context of decode
attention) writes each program's partial result to a workspace. Merging them in a second kernel costs a launch,
and a decode step has dozens of such ops. Instead each program, once its partial result is stored, counts itself
in on its output tile's counter (`last_to_arrive`: an atomic add with release and acquire order, after a barrier,
so every thread's stores are visible first). The program that arrives last reads all the partial results (from L2:
`cache_modifier=".cg"`) and merges them in split order, the same sums in the same order as a merge kernel, so
results are deterministic. It then sets the counter back to zero (`reset_count`), ready for the next launch and for
CUDA-graph replays.

`counters(device)` is one zeroed int32 buffer per device, shared by every such kernel and never reallocated (CUDA
graphs keep its address). Kernels using it must run one at a time on a device, as on the engine's one stream: a
kernel launched with programmatic dependent launch (`kernels.pdl`) waits for its predecessor before it touches
memory. Triton's interpreter runs programs one after another, so a missing order would show only on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_COUNTERS = 1 << 16  # output tiles of one launch: a million columns at the smallest matmul tile
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, needed: int) -> torch.Tensor:
    """The device's counters, all zero between launches; `needed` of them for one launch. Created on first use,
    which cannot happen during a CUDA-graph capture (new memory cannot be zeroed there): the engine's eager
    warm-up before its captures creates them."""
    if needed > MAX_COUNTERS:
        raise ValueError(f"a serial split reduction takes at most {MAX_COUNTERS} output tiles, got {needed}")
    buffer = _COUNTERS.get(device)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the split counters on {device} do not exist yet and a CUDA-graph capture cannot "
                               "zero new memory: run a split launch once before capturing")
        buffer = _COUNTERS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return buffer


@triton.jit
def last_to_arrive(count_ptr, index, arrivals: tl.constexpr):
    """Call after storing this program's partial result: whether it is the last of the `arrivals` programs of
    tile `index` (then it merges, and calls `reset_count`)."""
    tl.debug_barrier()  # every thread's partial result stored before the count releases it
    return tl.atomic_add(count_ptr + index, 1, sem="acq_rel") == arrivals - 1


@triton.jit
def reset_count(count_ptr, index):
    """The last program's final statement: the tile's counter back to zero for the next launch."""
    tl.atomic_xchg(count_ptr + index, 0)
