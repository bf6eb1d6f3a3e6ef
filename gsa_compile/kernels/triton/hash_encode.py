"""gsa::encode on Triton: projection, sign and bit packing in one pass over the vectors.

Each program takes BLOCK_L vectors that share one weight head (for queries: the G heads of a
GQA group of every batch row, so a decode step's whole query is a handful of programs),
projects them on up to 128 of the R hash directions with one float32-accurate matrix product
(wider codes take several programs), and packs the signs: the product's columns viewed as [R/8, 8] and summed with weights 1, 2, 4, ... 128
give the little-endian bytes. No unpacked bit reaches memory."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common import ceil_div, plane_layout
from . import runtime

# Vectors per program: large tiles for prefill (the weight is read once per tile), the
# smallest matrix-product tile for decode.
MAX_BLOCK_L = 128
MAX_HASH_BITS = 1024


@triton.jit
def _project(x_rows, row_ok, w_ptr, w_head, dim, hash_bits, sx_d, sw_h, sw_d, sw_r,
             BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """[BLOCK_L, BLOCK_R] float32 projections of the rows at x_rows on weight head w_head."""
    cols = tl.arange(0, BLOCK_R)
    projected = tl.zeros([BLOCK_L, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows[:, None] + dims[None, :] * sx_d,
                    mask=row_ok[:, None] & (dims[None, :] < dim), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + w_head * sw_h + dims[:, None] * sw_d + cols[None, :] * sw_r,
                    mask=(dims[:, None] < dim) & (cols[None, :] < hash_bits), other=0.0)
        # Three TF32 products reach float32 accuracy on the tensor cores, so signs agree with
        # the float32 reference except within ~1e-6 of zero (plain TF32 would flip ~0.1%).
        projected += tl.dot(x, w, input_precision="tf32x3")
    return projected


@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, out_ptr,
    batch, groups, num_vectors, dim, hash_bits,
    sx_b, sx_h, sx_l, sx_d,
    sw_h, sw_d, sw_r,
    so_b, so_h, so_l,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_rows = tl.program_id(0)
    w_head = tl.program_id(1)
    # This program's BLOCK_R hash directions start at r0 (wide codes take several programs).
    r0 = tl.program_id(2) * BLOCK_R
    # Rows of this program: (batch row, head of the group, vector) flattened.
    rows = pid_rows * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < batch * groups * num_vectors
    vector = rows % num_vectors
    head = w_head * groups + (rows // num_vectors) % groups
    # int64: offsets pass 2**31 elements on large caches (128 heads at 128K keys).
    b = (rows // (num_vectors * groups)).to(tl.int64)
    head = head.to(tl.int64)
    vector = vector.to(tl.int64)
    x_rows = x_ptr + b * sx_b + head * sx_h + vector * sx_l
    projected = _project(x_rows, row_ok, w_ptr + r0 * sw_r, w_head, dim, hash_bits - r0, sx_d, sw_h, sw_d, sw_r,
                         BLOCK_L, BLOCK_D, BLOCK_R)

    bit_values = 1 << (tl.arange(0, 8))
    bits = tl.reshape((projected >= 0).to(tl.int32), (BLOCK_L, BLOCK_R // 8, 8))
    packed = tl.sum(bits * bit_values[None, None, :], axis=2)
    out_bytes = tl.arange(0, BLOCK_R // 8)
    out_rows = out_ptr + b[:, None] * so_b + head[:, None] * so_h + vector[:, None] * so_l + r0 // 8
    tl.store(out_rows + out_bytes[None, :], packed.to(tl.uint8),
             mask=row_ok[:, None] & (out_bytes[None, :] < (hash_bits - r0) // 8))


@triton.jit
def _store_plane(out_ptr, bits, hash_bits, BLOCK_R: tl.constexpr):
    """Pack one plane's R bits (int32 0/1 [BLOCK_R]) into little-endian bytes at out_ptr."""
    packed = tl.sum(tl.reshape(bits, (BLOCK_R // 8, 8)) * (1 << tl.arange(0, 8))[None, :], axis=1)
    out_bytes = tl.arange(0, BLOCK_R // 8)
    tl.store(out_ptr + out_bytes, packed.to(tl.uint8), mask=out_bytes < hash_bits // 8)


@triton.jit
def _query_planes_kernel(
    x_ptr, w_ptr, out_ptr,
    kv_heads, dim, hash_bits,
    sx_b, sx_h, sx_d,
    sw_h, sw_d, sw_r,
    so_b, so_h, so_p,
    GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    DIRECT: tl.constexpr, PLANES: tl.constexpr, OFFSET: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // kv_heads).to(tl.int64)
    h = (pid % kv_heads).to(tl.int64)
    r0 = tl.program_id(1) * BLOCK_R
    # The group's heads BLOCK_G at a time: large groups (MLA's 128 heads share one latent)
    # keep the same register tile as small ones; only the per-direction counts accumulate.
    first = tl.zeros([BLOCK_R], dtype=tl.int32)
    counted = tl.zeros([BLOCK_R], dtype=tl.int32) + OFFSET
    for g0 in range(0, GROUPS, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        row_ok = rows < GROUPS
        x_rows = x_ptr + b * sx_b + (h * GROUPS + rows) * sx_h
        projected = _project(x_rows, row_ok, w_ptr + r0 * sw_r, h, dim, hash_bits - r0, sx_d, sw_h, sw_d, sw_r,
                             BLOCK_G, BLOCK_D, BLOCK_R)
        bits = ((projected >= 0) & row_ok[:, None]).to(tl.int32)
        first += tl.sum(tl.where(rows[:, None] == 0, bits, 0), axis=0)
        counted += tl.sum(tl.where(rows[:, None] >= DIRECT, bits, 0), axis=0)
    out = out_ptr + b * so_b + h * so_h + r0 // 8
    if DIRECT:
        _store_plane(out, first, hash_bits - r0, BLOCK_R)
    for j in tl.static_range(PLANES):
        _store_plane(out + (DIRECT + j) * so_p, (counted >> j) & 1, hash_bits - r0, BLOCK_R)


# Hash directions one program projects: wider codes (MLA's 576 bits) are split across programs,
# so the projection tile stays [rows, 128] whatever R is.
MAX_BLOCK_R = 128
# Query heads of a group one program projects at a time.
MAX_BLOCK_G = 64


def _tiles(dim: int, hash_bits: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, programs along R) of a projection: the weight tile stays within registers."""
    block_r = min(MAX_BLOCK_R, max(16, runtime.next_power_of_2(hash_bits)))
    return min(64, max(16, runtime.next_power_of_2(dim))), block_r, ceil_div(hash_bits, block_r)


def encode_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the codes of x [B, H, L, D] into out [B, H, L, R/8] (any strides, last dim dense)."""
    batch, heads, num_vectors, dim = x.shape
    kv_heads, hash_bits = weight.shape[0], weight.shape[-1]
    groups = heads // kv_heads
    weight = weight.to(device=x.device, dtype=torch.float32)
    rows = batch * groups * num_vectors
    block_l = min(MAX_BLOCK_L, max(16, runtime.next_power_of_2(rows)))
    block_d, block_r, r_programs = _tiles(dim, hash_bits)
    if rows and kv_heads:
        _encode_kernel[(ceil_div(rows, block_l), kv_heads, r_programs)](
            x, weight, out,
            batch, groups, num_vectors, dim, hash_bits,
            *x.stride(), *weight.stride(), *out.stride()[:3],
            BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4 if block_l * block_r <= 4096 else 8,
        )
    return out


def query_planes(query: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A decode query [B, Hq, 1, D] -> the packed sign planes of each KV head's group
    [B, Hkv, P, R/8] (kernels.common.sign_planes of its codes), in one launch: the planes
    replace the query codes, so scoring costs 1 + log2(G) popcounts per key word, not G."""
    batch, q_heads, _, dim = query.shape
    kv_heads, hash_bits = weight.shape[0], weight.shape[-1]
    groups = q_heads // kv_heads
    direct, planes, offset = plane_layout(groups)
    weight = weight.to(device=query.device, dtype=torch.float32)
    out = torch.empty((batch, kv_heads, direct + planes, hash_bits // 8), dtype=torch.uint8, device=query.device)
    block_g = min(MAX_BLOCK_G, max(16, runtime.next_power_of_2(groups)))
    block_d, block_r, r_programs = _tiles(dim, hash_bits)
    if batch and kv_heads:
        _query_planes_kernel[(batch * kv_heads, r_programs)](
            query, weight, out,
            kv_heads, dim, hash_bits,
            query.stride(0), query.stride(1), query.stride(3),
            *weight.stride(), *out.stride()[:3],
            GROUPS=groups, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_R=block_r,
            DIRECT=direct, PLANES=planes, OFFSET=offset, num_warps=4 if block_g * block_r <= 4096 else 8,
        )
    return out


def encode(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.empty((*x.shape[:-1], weight.shape[-1] // 8), dtype=torch.uint8, device=x.device)
    return encode_into(x, weight, out)


def encode_supports(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    # Any vector width: the projection walks the dims BLOCK_D at a time (MLA latent keys have 576).
    return runtime.first_reason(
        runtime.device_reason(x),
        runtime.dtype_reason("x", x),
        None if weight.shape[-1] <= MAX_HASH_BITS
        else f"hash_bits is {weight.shape[-1]}; the Triton encode packs at most {MAX_HASH_BITS}",
    )
