"""gsa::encode on Ascend: the float32 projection x @ W_h, packed by torch_npu.npu_sign_bits_pack.

npu_sign_bits_pack(1-D float16/float32, size) -> uint8 [size, n / 8 / size] sets a bit for every
value >= 0 and packs bit i of a byte from element 8b + i (little-endian), which is exactly our
code: bit = (x @ W_h >= 0), bit i of byte b is projected dim 8b + i. With size = number of
vectors, each output row is one vector's R / 8 bytes, because R is a multiple of 8."""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import project
from .runtime import torch_npu


def encode(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    projected = project(x, weight)  # float32: float64 input is declined below
    vectors = projected.shape[:-1].numel()
    packed = torch_npu().npu_sign_bits_pack(projected.reshape(-1), vectors)
    return packed.view(*projected.shape[:-1], projected.shape[-1] // 8)


def supports_encode(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    if x.dtype == torch.float64:
        # A float64 projection rounded to float32 can flip the sign of a tiny negative value to -0.0.
        return ("x is float64; npu_sign_bits_pack takes float16/float32, so float64 keeps the reference's "
                "float64 projection")
    if x.numel() == 0:
        return "x holds no vectors; npu_sign_bits_pack needs a non-empty input"
    return None
