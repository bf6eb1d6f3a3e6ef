"""gsa::select_blocks on Ascend: similarity through +-1 codes and a matmul, then the spec's block
reduction and top-k.

For +-1 vectors, R - 2 * hamming(q, k) = q . k, so the group's similarity to key j is
(sum_i q_i) . k_j: one matmul of the group-summed query signs with the key signs that
torch_npu.npu_sign_bits_unpack (uint8 -> +-1.0, little-endian) makes from the cached codes.
The signs and the matmul are float16 when every score fits its exact integers (|score| <= G * R
<= 2048; Ascend's matmul accumulates float16 in float32), else float32. Block scores are float32:
Ascend has no fast float64, which the reference uses (docs/npu.md says what that changes)."""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import select_from_similarity
from .encode import encode
from .runtime import torch_npu

# Largest +-1 key-sign tensor unpacked at once: long caches are scored in slices so the temporary
# stays bounded (R = 128, float16: 8192 tokens of 64 (row, KV head) pairs per slice).
UNPACKED_SLICE_BYTES = 128 << 20
# float16 represents every integer up to 2048 exactly.
FLOAT16_EXACT_INTEGERS = 2048


def token_similarity(query: torch.Tensor, key_codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 [B, Hkv, L]: sum over the group's query heads of R - 2 * hamming(code(q_i), code(k_j))."""
    npu = torch_npu()
    batch, kv_heads, num_keys, code_bytes = key_codes.shape
    bits, rows, groups = 8 * code_bytes, batch * kv_heads, query.shape[1] // kv_heads
    signs_dtype = torch.float16 if groups * bits <= FLOAT16_EXACT_INTEGERS else torch.float32
    query_codes = encode(query, weight)
    query_signs = npu.npu_sign_bits_unpack(query_codes.reshape(-1), batch * query.shape[1], signs_dtype)
    group_signs = query_signs.view(rows, groups, bits).sum(1).unsqueeze(-1)
    step = max(1, UNPACKED_SLICE_BYTES // (rows * bits * group_signs.element_size()))
    slices = []
    for start in range(0, num_keys, step):
        codes = key_codes[:, :, start:start + step].reshape(-1)
        key_signs = npu.npu_sign_bits_unpack(codes, codes.numel() // code_bytes, signs_dtype)
        slices.append(torch.bmm(key_signs.view(rows, -1, bits), group_signs).squeeze(-1))
    return torch.cat(slices, dim=-1).view(batch, kv_heads, num_keys).to(torch.float32)


def select_blocks(
    query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit=None
) -> torch.Tensor:
    similarity = token_similarity(query, key_codes, weight)
    return select_from_similarity(
        similarity, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit
    )


def supports_select_blocks(
    query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit=None
) -> Optional[str]:
    if query.dtype == torch.float64:
        return "query is float64; the NPU kernels hash in float32, so float64 keeps the reference's float64 projection"
    return None
