import functools
import os

import torch

# Triton's interpreter must be chosen before any kernel is decorated (see kernels/__init__.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: one intra-op thread beats two (thread hand-off costs more than the math at these sizes).
torch.set_num_threads(1)

# Property tests draw the same examples on every run (CI must not flake on a newly drawn edge case); the
# examples still vary across tests and parameters.
from hypothesis import settings  # noqa: E402

settings.register_profile("gotr1", derandomize=True, deadline=None, database=None, print_blob=True)
settings.load_profile("gotr1")

import pytest  # noqa: E402

POISON_INT = -(2**31) + 7


@pytest.fixture
def poison(monkeypatch):
    """Make every `torch.empty`/`torch.empty_like` during the test return NaN (or a sentinel int), so an output
    element a kernel forgets to write fails the comparison instead of passing on leftover memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(POISON_INT)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


@pytest.fixture
def gpu_rounding(monkeypatch):
    """Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even (LLVM fptrunc); round like
    the GPU (and torch) so that a bf16 band means the same on CPU and GPU. A no-op when compiling for real."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def rtne(data, src, dst, mode):
        if mode is None and src == tl.float32 and dst == tl.bfloat16:
            bits = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint32).astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            out[np.isnan(np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.float32))] = 0x7FC0
            return out.reshape(data.shape)
        return convert(data, src, dst, mode)

    monkeypatch.setattr(interpreter, "_convert_float", rtne)


@pytest.fixture(scope="session")
def poison_first_step():
    """`trainer -> None`: an inf in one gradient of the trainer's first step only (a hook on its first trainable
    parameter, a LoRA weight), the step a loss scaler must skip and an unscaled run must refuse (SFT and GRPO)."""
    def poison(trainer) -> None:
        trainer.params[0].register_hook(lambda g: g * float("inf") if trainer.step == 0 else g)

    return poison


@pytest.fixture(scope="session")
def boi_biased_tiny():
    """`(image_size, bias) -> bundle`: the tiny preset at `image_size` px with an `lm_head` bias of `bias` on
    `<begin_of_image>` (a random tiny model almost never samples it; bias 4 makes it about 9% likely per reasoning
    token, 5.5 about a third), so reasoning ends at random lengths. Cached across tests: never train one."""
    from gotr1.model import build_preset

    @functools.cache
    def build(image_size: int, bias: float):
        bundle = build_preset("tiny", image_size=image_size)
        head = bundle.model.lm_head
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        with torch.no_grad():
            head.bias[bundle.boi_id] = bias
        return bundle

    return build
