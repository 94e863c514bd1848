"""Programmatic dependent launch (PDL; Hopper and newer; FlashInfer's and SGLang's `enable_pdl`).

Kernels queued back to back on a stream leave the GPU idle between them: the next one is scheduled only once the
last one has finished and flushed. A decode step is a few hundred small kernels, so these gaps add up (in the
H100 profile of a Janus-Pro-1B rollout the device was idle about a tenth of the time; `bench rollout --profile`
reports the short gaps between kernels as `gap_short_s`). A kernel launched with PDL may be scheduled while its
predecessor still runs. It first lets its own successor launch (`gdc_launch_dependents`), then waits until the
predecessor has finished and its writes are visible (`gdc_wait`), before any memory access. Only the launch
latency overlaps, never the data. Both instructions are no-ops in a kernel launched without PDL.

The decode-step kernels take a `PDL` constexpr and begin with `pdl_prologue(PDL)`. Their wrappers launch with
`**pdl_launch()`, which turns PDL on only inside `programmatic_dependent_launch()`. The model runner enters that
context around decode steps on a GPU of compute capability 9.0 or newer, when `EngineConfig.enable_pdl` is set.
CUDA graphs captured inside it keep the programmatic edges.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import triton
import triton.language as tl

_ENABLED = contextvars.ContextVar("gotr1_pdl", default=False)


@contextlib.contextmanager
def programmatic_dependent_launch(enabled: bool = True) -> Iterator[None]:
    """Kernels launched inside (by the wrappers that support it) use PDL when `enabled`. Only for a CUDA device of
    compute capability 9.0 or newer: older GPUs and Triton's interpreter lack the instructions."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def pdl_launch() -> dict[str, bool]:
    """Launch arguments for a kernel with a `PDL` constexpr: PDL on inside `programmatic_dependent_launch()`."""
    return {"PDL": True, "launch_pdl": True} if _ENABLED.get() else {"PDL": False}


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """A kernel's first statement: let the next kernel launch now, then wait for the previous kernel's writes."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
