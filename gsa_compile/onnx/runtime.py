"""onnxruntime sessions whose gsa ops run this project's CPU kernels.

    session = gsa_compile.onnx.session("step.onnx")
    session.run(None, feeds)

Stock onnxruntime runs a gsa file through the model-local functions (the reference in standard
ops). `session` registers kernels for gsa.SelectTopBlocks (the selection every selecting op's
body calls) and gsa.SparseAttention (the attention over the selected blocks every site's body
calls), backed by the kernel dispatcher's CPU backend (gsa_compile.kernels.cpu: XOR + popcount
scoring straight from the packed codes, block top-k, one SDPA over the gathered blocks), with
the threads those kernels use (at most one per batch row). The rest of each site's body (mask
row, dense-fallback test, budget, the dense branch) stays in onnxruntime's own kernels.

The kernels are registered through onnxruntime's C API (native.py): they read onnxruntime's
input buffers in place, as torch tensors, so handing a kernel the whole KV cache costs nothing;
only the small outputs are copied into onnxruntime's buffers."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Optional, Sequence

import torch

from ..errors import GSABackendUnavailable, GSAError
from .schemas import DOMAIN, SELECT_TOP_BLOCKS, SPARSE_ATTENTION

logger = logging.getLogger(__name__)

# How many times each kernel ran in this process: tells a test or a benchmark that a session's
# op was served by the kernel, not by the model-local function.
calls: Counter = Counter()
_LIBRARY: list = []
_LOCK = threading.Lock()


class GSAKernelError(GSAError, RuntimeError):
    """A gsa kernel raised inside onnxruntime; the original exception is the cause."""


def availability() -> Optional[str]:
    """None when the custom kernels can be registered here, else why not."""
    try:
        _library()
    except GSABackendUnavailable as exc:
        return str(exc)
    return None


def _valid(valid: torch.Tensor, batch: int, num_keys: int) -> Optional[torch.Tensor]:
    """The schema's valid (broadcastable to [B, L]) as the kernels take it: None when all True
    (the bodies pass the mask row's valid keys; a mask that hides nothing then costs the
    kernels no masking: one pass over L booleans instead of a gather per selected token)."""
    if bool(valid.all()):
        return None
    return valid.expand(batch, num_keys)


def _key_norms(key_norms: torch.Tensor) -> Optional[torch.Tensor]:
    """None for the neutral [1, 1, 1] one (unweighted scores)."""
    if key_norms.numel() == 1 and float(key_norms.reshape(-1)[0]) == 1.0:
        return None
    return key_norms


def select_top_blocks(inputs: list, attributes: dict) -> list:
    """The gsa.SelectTopBlocks kernel (docs/onnx.md) on torch views of onnxruntime's inputs."""
    from ..kernels import dispatch

    query, key_codes, weight, valid, key_norms, k, must_select = inputs
    calls[SELECT_TOP_BLOCKS.name] += 1
    batch, _, num_keys, _ = key_codes.shape
    blocks = dispatch(
        "select_blocks", "cpu", query, key_codes, weight,
        _valid(valid, batch, num_keys), _key_norms(key_norms), attributes["chunk_size"], int(k.reshape(-1)[0]),
        [int(b) for b in must_select.reshape(-1)], attributes["repre"], attributes["scope"],
    )
    return [blocks.to(torch.int32)]


def sparse_attention(inputs: list, attributes: dict) -> list:
    """The gsa.SparseAttention kernel (docs/onnx.md) on torch views of onnxruntime's inputs."""
    from ..kernels import dispatch

    query, key, value, blocks, valid, attn_bias = inputs
    calls[SPARSE_ATTENTION.name] += 1
    batch, q_heads = query.shape[:2]
    num_keys = key.shape[2]
    # The schema's bias broadcasts to [B, Hq, 1, L]; the kernel takes [B, 1 or Hq, 1, L] or None.
    bias = None
    if bool(attn_bias.any()):
        bias = attn_bias.expand(batch, q_heads if attn_bias.shape[1] > 1 else 1, 1, num_keys)
    softcap = attributes["softcap"]
    out = dispatch(
        "sparse_attention", "cpu", query, key, value, blocks,
        _valid(valid, batch, num_keys), bias, attributes["chunk_size"], attributes["scale"],
        softcap if softcap > 0 else None,
    )
    return [out]


# The float types T a kernel is registered for (one OrtCustomOp per type: onnxruntime infers an
# output's type from a single type-generic input only). No bfloat16: onnxruntime's CPU provider
# lacks standard ops the bodies use (Greater) for it, so a bfloat16 file cannot run there anyway.
KERNEL_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


def _specs():
    from .native import ELEMENT_TYPES, KernelSpec

    specs = []
    for op, attributes, run in (
        (SELECT_TOP_BLOCKS, dict(chunk_size="int", repre="string", scope="string"), select_top_blocks),
        (SPARSE_ATTENTION, dict(chunk_size="int", scale="float", softcap="float"), sparse_attention),
    ):
        generic = any(p.type_str == "T" for p in (*op.inputs, *op.outputs))
        for float_type in KERNEL_FLOAT_TYPES if generic else KERNEL_FLOAT_TYPES[:1]:
            def types(params, float_type=float_type):
                return [ELEMENT_TYPES[float_type if p.type_str == "T" else p.type_str] for p in params]

            specs.append(KernelSpec(op.name, types(op.inputs), types(op.outputs), attributes, run))
    return specs


def _library():
    with _LOCK:
        if not _LIBRARY:
            from .native import CustomOpLibrary, NativeUnavailable

            try:
                _LIBRARY.append(CustomOpLibrary(DOMAIN, _specs()))
            except (NativeUnavailable, OSError) as exc:
                raise GSABackendUnavailable(f"the gsa kernels for onnxruntime cannot be registered: {exc}") from exc
            logger.info("gsa kernels for onnxruntime: %s", sorted({s.name for s in _LIBRARY[0].specs}))
        return _LIBRARY[0]


def _session_class():
    import onnxruntime as ort

    class GSASession(ort.InferenceSession):
        """An InferenceSession whose run re-raises what a gsa kernel raised during the call."""

        def run(self, output_names, input_feed, run_options=None):
            errors = _library().errors
            errors.pending = None
            try:
                result = super().run(output_names, input_feed, run_options)
            except Exception as exc:
                if errors.pending is not None:
                    raise GSAKernelError(f"a gsa kernel failed: {errors.pending}") from errors.pending
                raise exc
            if errors.pending is not None:
                raise GSAKernelError(f"a gsa kernel failed: {errors.pending}") from errors.pending
            return result

    return GSASession


# glibc's malloc settings for the kernels' per-call temporaries (a few MB: the gathered blocks,
# the scoring passes): served from the heap and kept there, instead of mapped fresh and faulted
# in page by page on every call (which cost as much as the kernels themselves at 8K keys).
# 32 MB is the largest mmap threshold glibc accepts.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_temporaries_in_heap() -> bool:
    """Set glibc's mmap and trim thresholds (mallopt) so that allocations up to 32 MB reuse heap
    memory; process-wide, idempotent. False where the C library has no mallopt (not glibc)."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def session(model, sess_options=None, providers: Sequence[str] = ("CPUExecutionProvider",),
            tune_malloc: bool = True):
    """An onnxruntime InferenceSession of `model` (a path or serialized bytes) whose gsa kernels
    run this project's CPU kernels; raises GSABackendUnavailable when they cannot be registered
    here (stock onnxruntime.InferenceSession then runs the same file through its functions).
    tune_malloc: keep_temporaries_in_heap() first (process-wide)."""
    import onnxruntime as ort

    library = _library()
    if tune_malloc and not keep_temporaries_in_heap():
        logger.info("no glibc mallopt here: the kernels' temporaries are allocated as the C library decides")
    options = sess_options or ort.SessionOptions()
    library.add_to(options)
    try:
        return _session_class()(model, options, providers=list(providers))
    except Exception as exc:
        if "CPUExecutionProvider" in providers and _holds_bfloat16(model):
            raise GSAError(
                "this ONNX model computes in bfloat16, which onnxruntime's CPU provider (and the gsa CPU "
                "kernels) do not run: export it in float32 or float16 (model.float() or model.half() before "
                f"gsa_compile.export_onnx), or pass a provider with bfloat16 kernels. onnxruntime said: {exc}"
            ) from exc
        raise


def _holds_bfloat16(model) -> bool:
    """Whether the model's graph inputs or weights are bfloat16 (read without external data)."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    bfloat16 = onnx.TensorProto.BFLOAT16
    return any(t.data_type == bfloat16 for t in proto.graph.initializer) or any(
        i.type.tensor_type.elem_type == bfloat16 for i in proto.graph.input)
