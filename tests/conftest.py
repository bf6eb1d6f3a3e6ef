import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The switch is read when a kernel
# is decorated, so it must be set before any test imports gsa_compile.kernels.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep test runs reproducible and light on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
