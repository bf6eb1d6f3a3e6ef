"""Whether torch_npu can serve the GSA kernels here, and the handle the kernels call it through.

torch_npu is looked up at call time (not held from import time), so the kernels always use the
module Python currently knows under that name: the real package on an Ascend host, or the
documented-semantics emulation the tests install in sys.modules."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

# The torch_npu operators the NPU kernels are written with.
REQUIRED_OPS = ("npu_sign_bits_pack", "npu_sign_bits_unpack", "npu_fused_infer_attention_score")

INSTALL_HINT = (
    "install the torch-npu release that matches your torch (pip install 'gsa-compile[npu]' pins "
    "torch-npu==2.13.0 for torch 2.13; other torch versions: pip install torch-npu==<torch version>) "
    "and the Ascend driver and CANN toolkit (source <CANN>/ascend-toolkit/set_env.sh before starting Python)"
)


def torch_npu() -> ModuleType:
    return importlib.import_module("torch_npu")


def availability() -> Optional[str]:
    """None when torch_npu loads and has every operator the kernels use, else why not and how to fix it."""
    try:
        module = torch_npu()
    except ModuleNotFoundError as exc:
        if exc.name != "torch_npu":
            return _cannot_load(exc)
        return f"torch_npu is not installed; {INSTALL_HINT}"
    # torch_npu reports a missing CANN library, driver or a torch version mismatch as any of
    # ImportError, OSError or RuntimeError, so every failure of its import is one diagnosis.
    except Exception as exc:
        return _cannot_load(exc)
    missing = [op for op in REQUIRED_OPS if not hasattr(module, op)]
    if missing:
        version = getattr(module, "__version__", "of unknown version")
        return f"torch_npu {version} lacks {missing}, which the GSA NPU kernels call; {INSTALL_HINT}"
    device_query = getattr(getattr(module, "npu", None), "is_available", None)
    if device_query is not None and not device_query():
        return ("torch_npu loads but sees no Ascend device (torch_npu.npu.is_available() is False); check the "
                "driver with `npu-smi info` and that ASCEND_RT_VISIBLE_DEVICES, if set, names a device")
    return None


def _cannot_load(exc: BaseException) -> str:
    reason = f"torch_npu is installed but cannot load ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") == "0":
        reason += (
            ". TORCH_DEVICE_BACKEND_AUTOLOAD=0 is set, which is why `import torch` worked: with it unset, "
            "torch loads torch_npu itself and this same error makes `import torch` fail"
        )
    return reason
