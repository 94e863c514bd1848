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
