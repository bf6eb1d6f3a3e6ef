"""The gsa custom ops (torch.library, namespace `gsa`): what graphs hold after rewriting.

Each op validates its inputs (also on fake tensors while tracing), has a fake implementation
with fixed-size outputs, and runs through the one dispatcher in gsa_compile.kernels.

- gsa::encode            keys (or queries) -> packed hash codes
- gsa::select_blocks     query + cached codes -> top-k block indices per (row, KV head)
- gsa::sparse_attention  exact attention over the selected blocks
- gsa::attention         one whole attention site: the dense-fallback rules (DESIGN 2.10),
                         then selection (or a reused selection) and sparse attention
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import kernels
from .kernels import common, reference
from .kernels import validation as check

logger = logging.getLogger(__name__)

# Reasons gsa::attention runs dense for a call, reported by explain_dense().
DENSE_REASONS = {
    "prefill": "more than one query token (prefill or chunked prefill): dense, codes only written",
    "causal_single_query": "is_causal with one query token attends key 0 only under SDPA's top-left rule",
    "short": "fewer keys than seq_len_threshold",
    "concurrency": "fewer than concurrency_threshold rows reach seq_len_threshold",
}


@torch.library.custom_op("gsa::encode", mutates_args=())
def encode(x: Tensor, weight: Tensor) -> Tensor:
    check.check_encode(x, weight)
    return kernels.dispatch("encode", x.device.type, x, weight)


@encode.register_fake
def _encode_fake(x, weight):
    check.check_encode(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[-1] // 8), dtype=torch.uint8)


@torch.library.custom_op("gsa::select_blocks", mutates_args=())
def select_blocks(
    query: Tensor, key_codes: Tensor, weight: Tensor, valid: Optional[Tensor], key_norms: Optional[Tensor],
    chunk_size: int, num_blocks: int, must_select: Sequence[int], repre: str, scope: str,
) -> Tensor:
    args = (query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, list(must_select), repre, scope)
    check.check_select(*args)
    return kernels.dispatch("select_blocks", query.device.type, *args)


@select_blocks.register_fake
def _select_blocks_fake(query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope):
    check.check_select(query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope)
    return key_codes.new_empty((key_codes.shape[0], key_codes.shape[1], num_blocks), dtype=torch.int32)


@torch.library.custom_op("gsa::sparse_attention", mutates_args=())
def sparse_attention(
    query: Tensor, key: Tensor, value: Tensor, blocks: Tensor, valid: Optional[Tensor],
    attn_bias: Optional[Tensor], chunk_size: int, scale: Optional[float], softcap: Optional[float],
) -> Tensor:
    check.check_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size)
    return kernels.dispatch(
        "sparse_attention", query.device.type, query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap
    )


@sparse_attention.register_fake
def _sparse_attention_fake(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap):
    check.check_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def dense_reason(
    query: Tensor, num_keys: int, valid: Optional[Tensor], is_causal: bool,
    seq_len_threshold: int, concurrency_threshold: int,
) -> Optional[str]:
    """Why this call runs dense (a DENSE_REASONS key), or None when it runs sparse."""
    if query.shape[2] > 1:
        return "prefill"
    if is_causal and num_keys > 1:
        return "causal_single_query"
    if num_keys < seq_len_threshold:
        return "short"
    if concurrency_threshold > 0:
        # Counting long rows from the mask reads the device on the host, which a CUDA graph
        # capture forbids: while capturing, every row counts as long (the cache has L keys).
        if valid is None or (valid.is_cuda and torch.cuda.is_current_stream_capturing()):
            rows = query.shape[0]
        else:
            rows = int((valid.sum(-1) >= seq_len_threshold).sum())
        if rows < concurrency_threshold:
            return "concurrency"
    return None


def dense_attention(query, key, value, attn_mask, is_causal, scale, softcap) -> Tensor:
    if softcap is not None:
        return reference.dense_attention(query, key, value, attn_mask, is_causal, scale, softcap)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )


@torch.library.custom_op("gsa::attention", mutates_args=())
def attention(
    query: Tensor, key: Tensor, value: Tensor, key_codes: Tensor, weight: Tensor,
    attn_mask: Optional[Tensor], key_norms: Optional[Tensor], reuse_blocks: Optional[Tensor],
    is_causal: bool, scale: Optional[float], softcap: Optional[float], chunk_size: int,
    top_k_ratio: Optional[float], budget_tokens: Optional[int], must_select: Sequence[int],
    repre: str, scope: str, seq_len_threshold: int, concurrency_threshold: int,
) -> tuple[Tensor, Tensor]:
    """One attention site. Returns (out, blocks): blocks is int32 [B, Hkv, ceil(L / C)], the
    selection ascending then -1, or every block (0..n-1) when the call ran dense."""
    _check_site(query, key, value, key_codes, weight, chunk_size, top_k_ratio, budget_tokens)
    batch, kv_heads, num_keys = key.shape[0], key.shape[1], key.shape[2]
    n_blocks = common.ceil_div(num_keys, chunk_size)
    valid, bias = (None, None)
    if query.shape[2] == 1:
        valid, bias = common.split_decode_mask(attn_mask, batch, query.shape[1], num_keys)
    reason = dense_reason(query, num_keys, valid, is_causal, seq_len_threshold, concurrency_threshold)
    if reason is not None:
        out = dense_attention(query, key, value, attn_mask, is_causal, scale, softcap)
        every_block = torch.arange(n_blocks, dtype=torch.int32, device=query.device)
        return out, every_block.expand(batch, kv_heads, n_blocks).contiguous()
    k = common.num_selected_blocks(
        num_keys, chunk_size, top_k_ratio=top_k_ratio, budget_tokens=budget_tokens, must_select=must_select
    )
    if reuse_blocks is None:
        blocks = select_blocks(query, key_codes, weight, valid, key_norms, chunk_size, k, list(must_select), repre, scope)
    else:
        blocks = reuse_blocks[..., :k]
    out = sparse_attention(query, key, value, blocks, valid, bias, chunk_size, scale, softcap)
    return out, torch.nn.functional.pad(blocks, (0, n_blocks - blocks.shape[-1]), value=-1)


@attention.register_fake
def _attention_fake(query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale,
                    softcap, chunk_size, top_k_ratio, budget_tokens, must_select, repre, scope,
                    seq_len_threshold, concurrency_threshold):
    _check_site(query, key, value, key_codes, weight, chunk_size, top_k_ratio, budget_tokens)
    n_blocks = (key.shape[2] + chunk_size - 1) // chunk_size
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    return out, key.new_empty((key.shape[0], key.shape[1], n_blocks), dtype=torch.int32)


def _check_site(query, key, value, key_codes, weight, chunk_size, top_k_ratio, budget_tokens) -> None:
    check.check_attention_inputs(query, key, value)
    check.check_weight(weight, key.shape[-1], key.shape[1])
    check.check_key_codes(key_codes, key, weight)
    check.check_chunk(chunk_size)
    if (top_k_ratio is None) == (budget_tokens is None):
        raise check.GSAInputError(
            f"gsa::attention needs exactly one of top_k_ratio and budget_tokens, got "
            f"top_k_ratio={top_k_ratio}, budget_tokens={budget_tokens}"
        )
