"""gsa::encode on Triton: projection, sign and bit packing in one pass over the vectors.

Each program takes BLOCK_L vectors of one head, projects them on all R hash directions with
one float32 matrix product, and writes R/8 packed bytes per vector. The weight's columns are
read in bit-major order (column c holds hash dim 8 * (c % BLOCK_BYTES) + c // BLOCK_BYTES), so
the eight bits of every output byte land in eight slices of the product and packing is a sum
of shifted slices: no unpacked bits ever reach memory."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common import ceil_div
from . import runtime

# Vectors per program: large tiles for prefill (the weight is re-read once per tile), the
# smallest matrix-product tile for decode.
MAX_BLOCK_L = 128


@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, out_ptr,
    num_heads, num_vectors, dim, groups,
    sx_b, sx_h, sx_l, sx_d,
    sw_h, sw_d, sw_r,
    so_b, so_h, so_l,
    NUM_BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    w_head = h // groups

    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, 8 * BLOCK_BYTES)
    col_byte = cols % BLOCK_BYTES
    col_bit = cols // BLOCK_BYTES
    hash_dim = 8 * col_byte + col_bit
    col_ok = col_byte < NUM_BYTES

    projected = tl.zeros([BLOCK_L, 8 * BLOCK_BYTES], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(
            x_ptr + b * sx_b + h * sx_h + rows[:, None] * sx_l + dims[None, :] * sx_d,
            mask=(rows[:, None] < num_vectors) & (dims[None, :] < dim), other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w_ptr + w_head * sw_h + dims[:, None] * sw_d + hash_dim[None, :] * sw_r,
            mask=(dims[:, None] < dim) & col_ok[None, :], other=0.0,
        )
        # Three TF32 products reach float32 accuracy on the tensor cores, so signs agree with
        # the float32 reference except within ~1e-6 of zero (plain TF32 would flip ~0.1%).
        projected += tl.dot(x, w, input_precision="tf32x3")

    bits = (projected >= 0).to(tl.int32) << col_bit[None, :]
    packed = tl.sum(tl.reshape(bits, (BLOCK_L, 8, BLOCK_BYTES)), axis=1)
    out_bytes = tl.arange(0, BLOCK_BYTES)
    tl.store(
        out_ptr + b * so_b + h * so_h + rows[:, None] * so_l + out_bytes[None, :],
        packed.to(tl.uint8),
        mask=(rows[:, None] < num_vectors) & (out_bytes[None, :] < NUM_BYTES),
    )


def encode_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the codes of x [B, H, L, D] into out [B, H, L, R/8] (any strides, last dim dense)."""
    batch, heads, num_vectors, dim = x.shape
    num_bytes = weight.shape[-1] // 8
    weight = weight.to(device=x.device, dtype=torch.float32)
    block_l = min(MAX_BLOCK_L, max(16, runtime.next_power_of_2(num_vectors)))
    block_bytes = max(2, runtime.next_power_of_2(num_bytes))
    grid = (ceil_div(num_vectors, block_l), batch * heads)
    if num_vectors and batch * heads:
        _encode_kernel[grid](
            x, weight, out,
            heads, num_vectors, dim, heads // weight.shape[0],
            *x.stride(), *weight.stride(), *out.stride()[:3],
            NUM_BYTES=num_bytes, BLOCK_BYTES=block_bytes, BLOCK_L=block_l,
            BLOCK_D=min(64 if block_bytes <= 16 else 32, max(16, runtime.next_power_of_2(dim))),
            num_warps=4 if block_l * block_bytes <= 512 else 8,
        )
    return out


def encode(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.empty((*x.shape[:-1], weight.shape[-1] // 8), dtype=torch.uint8, device=x.device)
    return encode_into(x, weight, out)


def encode_supports(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    return runtime.first_reason(
        runtime.device_reason(x),
        runtime.dtype_reason("x", x),
        runtime.head_dim_reason("x's last dim", x.shape[-1]),
        None if weight.shape[-1] <= 8 * 128 else f"hash_bits is {weight.shape[-1]}; the Triton encode packs at most 1024",
    )
