"""The public functional API of GSA (docs/semantics.md), on BHSD tensors.

    weight = hash_weights(num_kv_heads=8, head_dim=128, hash_bits=128, seed=0)
    codes = encode(key, weight)                       # once per key, when it enters the cache
    out = gsa_attention(query, key, value, weight, key_codes=codes, budget_tokens=2048)

Each function runs the `gsa` custom ops, so the same calls trace under torch.compile and
torch.export and pick the fastest kernel for the tensors' device. Bad arguments raise
GSAInputError naming the argument and what is allowed (docs/semantics.md)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .hashing import hash_weights
from .kernels import common
from .kernels.common import num_selected_blocks
from .kernels import validation as check

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
    check.check_encode(x, weight)
    return ops.encode(x, weight.to(x.device))


def key_norms(key: Tensor) -> Tensor:
    """[B, Hkv, L] L2 norms of keys, for key-norm weighted scores (float32)."""
    check.check_tensor("key", key)
    return torch.linalg.vector_norm(key.float(), dim=-1)


def _values_readable(*tensors) -> bool:
    """Whether checking tensor values here is allowed: not while tracing (fake tensors have
    none) and not while a CUDA graph is captured (reading the device would break it)."""
    if torch.compiler.is_compiling() or any(check.is_fake(t) for t in tensors):
        return False
    return not (any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing())


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
    check.check_must_select(must_select)
    check.check_chunk(chunk_size)
    check.check_tensor("query", query)
    check.check_tensor("weight", weight)
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
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """[B, Hq, 1, Dv]: exact attention of each query head over the valid tokens of its KV
    head's selected blocks. Each row of blocks lists distinct block ids, then -1 padding (what
    select_blocks returns); other values are refused. sinks (float [Hq]): a logit per query head
    whose exp joins the softmax denominator (attention sinks, as gpt-oss)."""
    check.check_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, sinks)
    check.check_scale_softcap(scale, softcap)
    # The op itself checks CPU block ids (free there); other devices are checked here, once.
    if blocks.device.type != "cpu" and _values_readable(blocks):
        check.check_block_values(blocks, common.ceil_div(key.shape[2], chunk_size))
    return ops.sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap, sinks)


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
    check.check_budget(top_k_ratio, budget_tokens)
    check.check_must_select(must_select)
    check.check_site_options(chunk_size, repre, scope, is_causal, scale, softcap, seq_len_threshold,
                             concurrency_threshold)
    check.check_attention_inputs(query, key, value)
    check.check_weight(weight, key.shape[-1], key.shape[1])
    if reuse_blocks is not None and _values_readable(reuse_blocks):
        check.check_tensor("reuse_blocks", reuse_blocks)
        check.check_block_values(reuse_blocks, common.ceil_div(key.shape[2], chunk_size), "reuse_blocks")
    weight = weight.to(key.device)
    if key_codes is None:
        key_codes = encode(key, weight)
    out, blocks = ops.attention(
        query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale,
        softcap, chunk_size, top_k_ratio, budget_tokens, list(must_select), repre, scope,
        seq_len_threshold, concurrency_threshold,
    )
    return (out, blocks) if return_blocks else out
