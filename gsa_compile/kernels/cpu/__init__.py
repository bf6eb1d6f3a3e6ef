"""CPU kernels: scoring straight from packed codes, attention over the selected blocks only.

Scoring: with s in {-1, +1}, sum_i (R - 2 hamming(q_i, k)) = <sum_i s(q_i), s(k)>. Summing the
group's query codes first leaves one small integer vector per KV head; a 256-entry table per
code byte then turns each key's R/8 code bytes into R/8 table lookups (embedding_bag sums
them), so keys are never unpacked. Attention gathers the selected blocks' tokens and runs
exact softmax attention on them alone; no score over all L keys is formed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import register_kernel
from ..common import block_token_index, unpack_codes
from ..reference import encode, masked_attention, select_from_similarity

_BYTE_BITS = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """[8, 256] float32: entry (i, v) is bit i of byte value v."""
    key = str(device)
    if key not in _BYTE_BITS:
        values = torch.arange(256, dtype=torch.int64)
        _BYTE_BITS[key] = ((values[None, :] >> torch.arange(8)[:, None]) & 1).to(torch.float32).to(device)
    return _BYTE_BITS[key]


def token_similarity(query: torch.Tensor, key_codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L] float32 similarities from packed codes via per-byte lookup tables."""
    batch, kv_heads, num_keys, code_bytes = key_codes.shape
    groups = query.shape[1] // kv_heads
    query_signs = unpack_codes(encode(query, weight))[:, :, 0, :].to(torch.float32) * 2 - 1
    group_sum = query_signs.reshape(batch, kv_heads, groups, code_bytes * 8).sum(2)
    # table[b, h, byte, v] = sum of group_sum over the set bits of v in that byte
    table = group_sum.reshape(batch, kv_heads, code_bytes, 8) @ _byte_bits(query.device)
    offsets = torch.arange(batch * kv_heads * code_bytes, dtype=torch.int32, device=query.device) * 256
    index = torch.add(offsets.reshape(batch, kv_heads, 1, code_bytes), key_codes)  # one int32 pass
    gathered = F.embedding_bag(index.reshape(-1, code_bytes), table.reshape(-1, 1), mode="sum")
    return gathered.reshape(batch, kv_heads, num_keys) * 2 - group_sum.sum(-1, keepdim=True)


def select_blocks(query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope):
    similarity = token_similarity(query, key_codes, weight)
    return select_from_similarity(similarity, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope)


def gather_selected(key, value, blocks, valid, attn_bias, chunk_size):
    """Keys, values, allowed mask [B, Hkv, 1, k*C] and bias [B, Hkv, 1 or G, k*C] of the selected blocks."""
    batch, kv_heads, num_keys, _ = key.shape
    tokens, allowed = block_token_index(blocks, chunk_size, num_keys)
    # Advanced indexing copies whole D-long rows (gather would read one index per element).
    rows = torch.arange(batch, device=key.device)[:, None, None]
    heads = torch.arange(kv_heads, device=key.device)[None, :, None]
    keys, values = key[rows, heads, tokens], value[rows, heads, tokens]
    if valid is not None:
        allowed = allowed & valid.gather(1, tokens.reshape(batch, -1)).reshape(allowed.shape)
    bias = None
    if attn_bias is not None:
        # [B, Hkv, 1 or G, L]: one bias row per KV head, or one per query head of its group.
        q_heads = attn_bias.shape[1]
        per_kv = attn_bias[:, :, 0, :].reshape(batch, -1, max(q_heads // kv_heads, 1), num_keys)
        per_kv = per_kv.expand(batch, kv_heads, -1, -1)
        index = tokens.unsqueeze(2).expand(-1, -1, per_kv.shape[2], -1)
        bias = per_kv.gather(-1, index)
    return keys, values, allowed.unsqueeze(2), bias


def sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap):
    keys, values, allowed, bias = gather_selected(key, value, blocks, valid, attn_bias, chunk_size)
    if bias is not None:
        groups = query.shape[1] // key.shape[1]
        bias = bias.expand(-1, -1, groups, -1).reshape(query.shape[0], query.shape[1], 1, -1)
    return masked_attention(query, keys, values, allowed, bias, scale, softcap)


register_kernel("select_blocks", "cpu", select_blocks)
register_kernel("sparse_attention", "cpu", sparse_attention)
