import sys

import pytest

from gsa_compile import kernels

from . import torch_npu_emulation


def forget_npu_backend(monkeypatch) -> None:
    """Make the dispatcher re-check torch_npu on its next use; the test's end restores the old state."""
    monkeypatch.setitem(kernels._LOADED, "npu", None)
    del kernels._LOADED["npu"]


@pytest.fixture
def emulated_npu(monkeypatch):
    """The torch_npu emulation installed as sys.modules["torch_npu"]; yields it (its .calls log)."""
    module = torch_npu_emulation.build()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    forget_npu_backend(monkeypatch)
    return module
