"""gsa::sparse_attention on Ascend: torch_npu.npu_fused_infer_attention_score over a block table
of the selected blocks (its paged-attention decode path, query layout BNSD).

Selection is per (batch row, KV head), but a block table has one row per batch entry, so each
(row, KV head) pair becomes one FIA batch entry holding that head's G query heads
(num_heads = G, num_key_value_heads = 1) and a table of its own selected blocks:
- the KV cache is already in pages when it is contiguous and L is a multiple of the chunk size:
  [B, Hkv, L, D] is then [B * Hkv * n_blocks, C, D] with no copy, and block c of pair p is page
  p * n_blocks + c;
- otherwise the selected blocks are gathered into fresh pages (only k * C tokens per pair move).
Slots of -1 blocks, tokens past the cache and masked keys are hidden by FIA's atten_mask (True
= masked). An attention bias goes through pse_shift; FIA's documentation does not say whether
pse_shift is added before or after the scale, so the scale is then applied to the query and FIA
runs with scale 1, where both readings agree. Pairs or heads left with no key return zeros, as
in the reference, whatever FIA computes for a fully masked row. Attention sinks scale FIA's output
by sigmoid(lse - sink), from the log-sum-exp FIA returns with softmax_lse_flag."""

from __future__ import annotations

from typing import Optional

import torch

from ..common import block_token_index
from .runtime import torch_npu

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
# Limits npu_fused_infer_attention_score documents for one query token with a block table.
MAX_GROUP = 64  # num_heads / num_key_value_heads
MAX_HEAD_DIM = 512
MAX_BATCH = 65536  # here: B * Hkv (row, KV head) pairs
MAX_KEYS = 262144  # here: k * C selected tokens per pair
PAGE_ALIGN = 16  # float16/bfloat16 pages hold a multiple of 16 tokens
MAX_PAGE = 512
INT32_ELEMENTS = 2 ** 31  # a paged key or value tensor must have fewer elements than this


def sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap, sinks=None) -> torch.Tensor:
    batch, q_heads, _, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    groups, pairs = q_heads // kv_heads, batch * kv_heads
    span = blocks.shape[-1] * chunk_size
    scale = dim ** -0.5 if scale is None else scale
    tokens, allowed = block_token_index(blocks, chunk_size, num_keys)
    if valid is not None:
        allowed = allowed & valid.gather(1, tokens.view(batch, -1)).view_as(tokens)
    key_pages, value_pages, block_table = _pages(key, value, blocks, tokens, chunk_size)
    q = query.reshape(pairs, groups, 1, dim)
    bias = None
    if attn_bias is not None:
        bias = _selected_bias(attn_bias, tokens, groups).to(query.dtype)
        q, scale = q * scale, 1.0
    out, lse = torch_npu().npu_fused_infer_attention_score(
        q.contiguous(), key_pages, value_pages,
        pse_shift=bias,
        atten_mask=~allowed.view(pairs, 1, 1, span),
        actual_seq_lengths_kv=[span],
        block_table=block_table,
        num_heads=groups,
        num_key_value_heads=1,
        scale=scale,
        input_layout="BNSD",
        block_size=chunk_size,
        softmax_lse_flag=sinks is not None,
    )
    if sinks is not None:
        # With a sink logit s the weights are FIA's times e^lse / (e^lse + e^s) = sigmoid(lse - s).
        sink = sinks.to(torch.float32).view(1, kv_heads, groups).expand(batch, -1, -1).reshape(pairs, groups, 1, 1)
        out = (out.to(torch.float32) * torch.sigmoid(lse.view(pairs, groups, 1, 1) - sink)).to(out.dtype)
    attended = allowed.view(pairs, 1, span)
    if bias is not None:
        attended = attended & (bias.view(pairs, groups, span) > float("-inf"))
    out = torch.where(attended.any(-1)[..., None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.reshape(batch, q_heads, 1, value.shape[-1])


def _pages(key, value, blocks, tokens, chunk_size):
    """(key pages [P, C, D], value pages [P, C, Dv], int32 block table [B * Hkv, k])."""
    batch, kv_heads, num_keys, _ = key.shape
    pairs, k = batch * kv_heads, blocks.shape[-1]
    if _cache_is_paged(key, value, chunk_size):
        n_blocks = num_keys // chunk_size
        first_page = torch.arange(pairs, dtype=torch.int32, device=blocks.device).view(batch, kv_heads, 1) * n_blocks
        # -1 slots point at the pair's first page; atten_mask hides them.
        table = first_page + blocks.to(torch.int32).clamp(min=0)
        return _as_pages(key, chunk_size), _as_pages(value, chunk_size), table.view(pairs, k)
    row = torch.arange(batch, device=tokens.device).view(batch, 1, 1)
    head = torch.arange(kv_heads, device=tokens.device).view(1, kv_heads, 1)
    table = torch.arange(pairs * k, dtype=torch.int32, device=blocks.device).view(pairs, k)
    return _as_pages(key[row, head, tokens], chunk_size), _as_pages(value[row, head, tokens], chunk_size), table


def _cache_is_paged(key, value, chunk_size) -> bool:
    return (
        key.shape[2] % chunk_size == 0
        and key.is_contiguous() and value.is_contiguous()
        and key.numel() < INT32_ELEMENTS and value.numel() < INT32_ELEMENTS
    )


def _as_pages(cache: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, Hkv, n * C, D] contiguous -> [B * Hkv * n, C, D], FIA's (blocknum, blocksize, H) layout."""
    return cache.view(-1, chunk_size, cache.shape[-1])


def _selected_bias(attn_bias: torch.Tensor, tokens: torch.Tensor, groups: int) -> torch.Tensor:
    """attn_bias [B, 1 or Hq, 1, L] at the selected slots -> [B * Hkv, G, 1, k * C] (pse_shift's (B, N, 1, S))."""
    batch, kv_heads, span = tokens.shape
    per_head = attn_bias.expand(batch, kv_heads * groups, 1, attn_bias.shape[-1])
    per_head = per_head.reshape(batch, kv_heads, groups, attn_bias.shape[-1])
    index = tokens.unsqueeze(2).expand(batch, kv_heads, groups, span)
    return per_head.gather(-1, index).view(batch * kv_heads, groups, 1, span)


def supports_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap,
                              sinks=None) -> Optional[str]:
    groups = query.shape[1] // key.shape[1]
    span = blocks.shape[-1] * chunk_size
    checks = (
        (softcap is None, f"softcap={softcap}: npu_fused_infer_attention_score has no logit softcap"),
        (query.dtype in ATTENTION_DTYPES,
         f"query is {query.dtype}; npu_fused_infer_attention_score takes float16 or bfloat16"),
        (key.shape[-1] == value.shape[-1],
         f"key head dim {key.shape[-1]} != value head dim {value.shape[-1]}; "
         f"npu_fused_infer_attention_score needs key and value of one shape"),
        (query.shape[-1] <= MAX_HEAD_DIM, f"head dim {query.shape[-1]} > {MAX_HEAD_DIM}, the most FIA takes"),
        (groups <= MAX_GROUP, f"{groups} query heads per KV head > {MAX_GROUP}, the most FIA takes"),
        (chunk_size % PAGE_ALIGN == 0 and chunk_size <= MAX_PAGE,
         f"chunk_size={chunk_size}: FIA pages of float16/bfloat16 hold a multiple of {PAGE_ALIGN} tokens, "
         f"at most {MAX_PAGE}"),
        (query.shape[0] * key.shape[1] <= MAX_BATCH,
         f"{query.shape[0] * key.shape[1]} (row, KV head) pairs > {MAX_BATCH}, FIA's batch limit"),
        (span <= MAX_KEYS, f"{span} selected tokens per KV head > {MAX_KEYS}, FIA's sequence limit"),
    )
    return next((reason for ok, reason in checks if not ok), None)
