"""Triton kernels of the GSA ops for CUDA GPUs (and CPU tensors under TRITON_INTERPRET=1).

Importing this package registers them with the dispatcher; it raises GSABackendUnavailable
when Triton is missing or there is neither a CUDA device nor the interpreter, so the
dispatcher serves the reference and logs why."""

from __future__ import annotations

import torch

from ...errors import GSABackendUnavailable

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise GSABackendUnavailable(f"the Triton kernels need the triton package: {exc}") from exc

from .. import register_kernel
from . import runtime

if not (runtime.INTERPRETING or torch.cuda.is_available()):
    raise GSABackendUnavailable(
        "the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before gsa_compile.kernels.triton is imported"
    )

from .decode_attention import sparse_attention, sparse_attention_supports  # noqa: E402
from .hash_encode import encode, encode_supports  # noqa: E402
from .selection import select_blocks, select_blocks_supports  # noqa: E402

register_kernel("encode", "triton", encode, supports=encode_supports)
register_kernel("select_blocks", "triton", select_blocks, supports=select_blocks_supports)
register_kernel("sparse_attention", "triton", sparse_attention, supports=sparse_attention_supports)
