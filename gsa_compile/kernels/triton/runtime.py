"""What every Triton kernel wrapper needs: where the kernels can run, launch sizing, and the
checks their supports() functions share."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

# Triton chooses between compiling and interpreting when a kernel is decorated, so the mode
# is fixed when this package is imported.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Widest head dim a kernel keeps in registers as one tile.
MAX_HEAD_DIM = 512


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def device_reason(*tensors: torch.Tensor) -> Optional[str]:
    """Why these tensors cannot be handed to a Triton kernel here, or None."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRETING:
            continue
        return (f"Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                f"gsa_compile.kernels.triton is imported), got a {t.device.type} tensor")
    return None


def dtype_reason(name: str, t: torch.Tensor) -> Optional[str]:
    if t.dtype not in KERNEL_DTYPES:
        return f"{name} is {t.dtype}; the Triton kernels take float16, bfloat16 or float32"
    return None


def head_dim_reason(name: str, dim: int) -> Optional[str]:
    if dim > MAX_HEAD_DIM:
        return f"{name} is {dim}; the Triton kernels hold at most {MAX_HEAD_DIM} dims in one tile"
    return None


def first_reason(*reasons: Optional[str]) -> Optional[str]:
    return next((r for r in reasons if r is not None), None)


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: Optional[int]) -> int:
    """Programs a launch should offer to fill the device (a small fixed count when interpreting)."""
    if device_index is None or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(t: torch.Tensor) -> Optional[int]:
    if t.device.type != "cuda":
        return None
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def code_words(codes: torch.Tensor) -> torch.Tensor:
    """Packed codes [..., R/8] uint8 seen as int32 words when R is a multiple of 32 (four
    times fewer XOR/popcount steps), else as they are."""
    if codes.shape[-1] % 4 == 0 and codes.stride(-1) == 1 and all(
        s % 4 == 0 for s in codes.stride()[:-1]
    ) and codes.storage_offset() % 4 == 0:
        return codes.view(torch.int32)
    return codes
