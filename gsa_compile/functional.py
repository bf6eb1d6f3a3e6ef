"""The public functional API of GSA (DESIGN section 2), on BHSD tensors.

    weight = hash_weights(num_kv_heads=8, head_dim=128, hash_bits=128, seed=0)
    codes = encode(key, weight)                       # once per key, when it enters the cache
    out = gsa_attention(query, key, value, weight, key_codes=codes, budget_tokens=2048)

Each function runs the `gsa` custom ops, so the same calls trace under torch.compile and
torch.export and pick the fastest kernel for the tensors' device."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .errors import GSAInputError
from .hashing import hash_weights
from .kernels.common import num_selected_blocks

__all__ = [
    "hash_weights",
    "encode",
    "select_blocks",
    "sparse_attention",
    "gsa_attention",
    "num_selected_blocks",
    "key_norms",
]


def encode(x: Tensor, weight: Tensor) -> Tensor:
    """x [B, H, L, D], weight [Hkv, D, R] (H a multiple of Hkv) -> uint8 [B, H, L, R // 8];
    bit = (x @ W_h >= 0), bit i of byte b is projected dim 8b + i."""
    return ops.encode(x, weight.to(x.device))


def key_norms(key: Tensor) -> Tensor:
    """[B, Hkv, L] L2 norms of keys, for key-norm weighted scores (float32)."""
    return torch.linalg.vector_norm(key.float(), dim=-1)


def select_blocks(
    query: Tensor,
    key_codes: Tensor,
    weight: Tensor,
    *,
    chunk_size: int,
    num_blocks: int,
    must_select: Sequence[int] = (0, -2, -1),
    repre: str = "max",
    valid: Optional[Tensor] = None,
    key_norms: Optional[Tensor] = None,
    scope: str = "per_head",
) -> Tensor:
    """query [B, Hq, 1, D], key_codes [B, Hkv, L, R // 8], valid [B, L] bool or None ->
    int32 [B, Hkv, num_blocks]: ascending block indices, -1 where a row has fewer valid blocks."""
    return ops.select_blocks(
        query, key_codes, weight.to(query.device), valid, key_norms, chunk_size, num_blocks,
        list(must_select), repre, scope,
    )


def sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    blocks: Tensor,
    *,
    chunk_size: int,
    scale: Optional[float] = None,
    valid: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    softcap: Optional[float] = None,
) -> Tensor:
    """[B, Hq, 1, Dv]: exact attention of each query head over the valid tokens of its KV
    head's selected blocks (-1 entries are ignored)."""
    return ops.sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap)


def gsa_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weight: Tensor,
    *,
    chunk_size: int = 128,
    top_k_ratio: Optional[float] = None,
    budget_tokens: Optional[int] = None,
    must_select: Sequence[int] = (0, -2, -1),
    repre: str = "max",
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    key_codes: Optional[Tensor] = None,
    key_norms: Optional[Tensor] = None,
    is_causal: bool = False,
    softcap: Optional[float] = None,
    scope: str = "per_head",
    seq_len_threshold: int = 0,
    concurrency_threshold: int = 0,
    reuse_blocks: Optional[Tensor] = None,
    return_blocks: bool = False,
):
    """Drop-in for scaled_dot_product_attention(query, key, value, attn_mask, is_causal,
    scale, enable_gqa=True) that attends only the top-k blocks when decoding (T == 1).

    Give exactly one of top_k_ratio and budget_tokens. Pass key_codes (encode(key, weight),
    kept beside the KV cache) to avoid encoding the whole cache on every call. Calls with more
    than one query token, fewer than seq_len_threshold keys, or fewer than
    concurrency_threshold long rows run dense SDPA. return_blocks=True also returns the
    selection ([B, Hkv, ceil(L / C)], ascending then -1) for reuse by another layer."""
    if (top_k_ratio is None) == (budget_tokens is None):
        raise GSAInputError(
            f"give exactly one of top_k_ratio and budget_tokens, got top_k_ratio={top_k_ratio}, "
            f"budget_tokens={budget_tokens}"
        )
    weight = weight.to(key.device)
    if key_codes is None:
        key_codes = encode(key, weight)
    out, blocks = ops.attention(
        query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale,
        softcap, chunk_size, top_k_ratio, budget_tokens, list(must_select), repre, scope,
        seq_len_threshold, concurrency_threshold,
    )
    return (out, blocks) if return_blocks else out
