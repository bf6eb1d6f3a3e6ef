"""onnxruntime sessions whose gsa ops run this project's CPU kernels.

    session = gsa_compile.onnx.session("step.onnx")        # needs onnxruntime-extensions
    session.run(None, feeds)

Stock onnxruntime runs a gsa file through the model-local functions (the reference in standard
ops). `session` registers, through onnxruntime-extensions' Python custom ops, a kernel for
gsa.SelectTopBlocks (the selection every selecting op's body calls) backed by
gsa_compile.kernels: the CPU backend's XOR + popcount scoring straight from the packed codes and
its block top-k. The rest of every body (dense fallback, gather of the selected blocks, attention)
stays in onnxruntime's own kernels: a Python custom op receives copies of its inputs, so a kernel
fed the whole KV cache would spend more on the copy than it saves, while the codes it reads are
1/16 of the keys."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import GSABackendUnavailable
from .schemas import DOMAIN, SELECT_TOP_BLOCKS

logger = logging.getLogger(__name__)

EXTRA = "onnx-fast"
# How many times each kernel ran in this process: tells a test or a benchmark that a session's
# op was served by the kernel, not by the model-local function.
calls: Counter = Counter()
_REGISTERED: list = []
_LOCK = threading.Lock()


def availability() -> Optional[str]:
    """None when the custom kernels can be registered here, else why not."""
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError as exc:
        return (f"onnxruntime-extensions is not installed ({exc}); pip install \"gsa-compile[{EXTRA}]\" "
                f"(or pip install onnxruntime-extensions)")
    return None


def select_top_blocks(query, key_codes, weight, valid, key_norms, k, must_select, chunk_size, repre, scope):
    """The gsa.SelectTopBlocks kernel (docs/onnx.md) on numpy arrays, through the kernel
    dispatcher's CPU backend."""
    from ..kernels import dispatch

    calls[SELECT_TOP_BLOCKS.name] += 1
    batch, _, num_keys, _ = key_codes.shape
    valid = np.broadcast_to(valid, (batch, num_keys))
    norms = None if key_norms.size == 1 and float(key_norms.reshape(-1)[0]) == 1.0 else torch.from_numpy(key_norms)
    blocks = dispatch(
        "select_blocks", "cpu", torch.from_numpy(query), torch.from_numpy(key_codes), torch.from_numpy(weight),
        None if valid.all() else torch.from_numpy(np.ascontiguousarray(valid)), norms, int(chunk_size),
        int(k.reshape(-1)[0]), [int(b) for b in must_select.reshape(-1)], repre, scope,
    )
    return blocks.to(torch.int32).numpy()


def register_kernels() -> None:
    """Register the gsa custom ops with onnxruntime-extensions (once per process)."""
    reason = availability()
    if reason is not None:
        raise GSABackendUnavailable(f"the gsa kernels for onnxruntime cannot be registered: {reason}")
    with _LOCK:
        if _REGISTERED:
            return
        from onnxruntime_extensions import PyCustomOpDef, onnx_op

        types = {"tensor(float)": PyCustomOpDef.dt_float, "tensor(uint8)": PyCustomOpDef.dt_uint8,
                 "tensor(bool)": PyCustomOpDef.dt_bool, "tensor(int64)": PyCustomOpDef.dt_int64,
                 "tensor(int32)": PyCustomOpDef.dt_int32}
        attrs = {"chunk_size": PyCustomOpDef.dt_int64, "repre": PyCustomOpDef.dt_string,
                 "scope": PyCustomOpDef.dt_string}
        spec = SELECT_TOP_BLOCKS
        _REGISTERED.append(onnx_op(
            op_type=f"{DOMAIN}::{spec.name}", inputs=[types[p.type_str] for p in spec.inputs],
            outputs=[types[p.type_str] for p in spec.outputs], attrs=attrs,
        )(select_top_blocks))
        logger.info("registered the gsa.%s kernel with onnxruntime-extensions", spec.name)


def session(model, sess_options=None, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An onnxruntime InferenceSession of `model` (a path or serialized bytes) whose gsa ops run
    this project's CPU kernels; raises GSABackendUnavailable when onnxruntime-extensions is
    missing (stock onnxruntime.InferenceSession then runs the same file through its functions)."""
    import onnxruntime as ort

    register_kernels()
    from onnxruntime_extensions import get_library_path

    options = sess_options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model, options, providers=list(providers))
