"""Triton kernels, one op per file, each beside its plain-torch reference.

Without a CUDA device the kernels run in Triton's interpreter (slow, for tests at small shapes): the
switch must be set before any `@triton.jit` decorator executes, hence here, before the op modules import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
