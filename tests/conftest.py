import os

import torch

# Triton's interpreter must be chosen before any kernel is decorated (see kernels/__init__.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: one intra-op thread beats two (thread hand-off costs more than the math at these sizes).
torch.set_num_threads(1)
