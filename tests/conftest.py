import os

import torch

# Triton's interpreter must be chosen before any kernel is decorated (see kernels/__init__.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
