"""gsa_compile without a working torch_npu: it imports and runs, and asking for the npu backend
says what is missing and how to fix it."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import gsa_compile
from gsa_compile import GSABackendUnavailable, use_backend
from gsa_compile import functional as F
from gsa_compile.kernels import npu

from .conftest import forget_npu_backend

BROKEN_TORCH_NPU = "raise OSError('libascendcl.so: cannot open shared object file: No such file or directory')\n"


def install_broken_torch_npu(tmp_path, monkeypatch):
    """A torch_npu package that is installed (importable) but fails to load, like one without CANN."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(BROKEN_TORCH_NPU)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_npu_backend(monkeypatch)


def test_absent_torch_npu_names_the_package_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # what `import torch_npu` sees when it is not installed
    forget_npu_backend(monkeypatch)
    assert npu.availability().startswith("torch_npu is not installed")
    with pytest.raises(GSABackendUnavailable, match=r"torch_npu is not installed.*gsa-compile\[npu\]"):
        with use_backend("npu"):
            pass


def test_installed_but_broken_torch_npu_says_it_cannot_load_and_why(tmp_path, monkeypatch):
    install_broken_torch_npu(tmp_path, monkeypatch)
    monkeypatch.setenv("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    with pytest.raises(GSABackendUnavailable) as error:
        with use_backend("npu"):
            pass
    message = str(error.value)
    assert "installed but cannot load" in message and "libascendcl.so" in message
    assert "CANN" in message and "TORCH_DEVICE_BACKEND_AUTOLOAD=0 is set" in message


def test_npu_tensors_fall_back_to_the_reference_when_torch_npu_cannot_load(tmp_path, monkeypatch):
    install_broken_torch_npu(tmp_path, monkeypatch)
    key = torch.randn(1, 2, 20, 16)
    weight = F.hash_weights(2, 16, 16)
    kernel = gsa_compile.kernels.choose_kernel("encode", "npu", key, weight)
    assert kernel.backend == "reference"


def test_a_torch_npu_without_the_operators_names_them(monkeypatch):
    old = types.ModuleType("torch_npu")
    old.__version__ = "2.1.0"
    old.npu_sign_bits_pack = old.npu_sign_bits_unpack = lambda *args: None
    monkeypatch.setitem(sys.modules, "torch_npu", old)
    assert npu.availability().startswith("torch_npu 2.1.0 lacks ['npu_fused_infer_attention_score']")


def test_a_torch_npu_that_sees_no_device_says_so(monkeypatch):
    loaded = types.ModuleType("torch_npu")
    loaded.npu_sign_bits_pack = loaded.npu_sign_bits_unpack = loaded.npu_fused_infer_attention_score = print
    loaded.npu = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", loaded)
    assert "sees no Ascend device" in npu.availability()


def test_gsa_compile_imports_in_a_process_whose_torch_npu_is_broken(tmp_path):
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(BROKEN_TORCH_NPU)
    script = textwrap.dedent("""
        import sys, gsa_compile
        import gsa_compile.kernels.npu  # importing the backend never imports torch_npu
        assert "torch_npu" not in sys.modules
        try:
            with gsa_compile.use_backend("npu"):
                pass
        except gsa_compile.GSABackendUnavailable as exc:
            print(exc)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]), TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch_npu is installed but cannot load" in result.stdout
