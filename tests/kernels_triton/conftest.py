"""Triton kernel tests run in two modes:

- default (CI, no GPU): CPU tensors through the Triton interpreter at small sizes;
- GSA_TRITON_DEVICE=cuda: the same tests on the GPU at real sizes (run there by hand:
  GSA_TRITON_DEVICE=cuda python -m pytest -q tests/kernels_triton).

Triton picks interpret or compile when a kernel is decorated, so the switch has to be set
before anything imports gsa_compile.kernels.triton: pytest imports conftest files while
collecting, before any test runs."""

import os

import pytest

ON_CUDA = os.environ.get("GSA_TRITON_DEVICE", "cpu") == "cuda"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device():
    return "cuda" if ON_CUDA else "cpu"


@pytest.fixture(scope="session")
def real_sizes():
    return ON_CUDA
