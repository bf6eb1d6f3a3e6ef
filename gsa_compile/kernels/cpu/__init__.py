"""CPU kernels: scoring straight from packed codes, attention over the selected blocks only.

Scoring XORs each key's packed code with the sign planes of its group's summed query (1 + log2 G
of them, not G codes: kernels.common.plane_layout) and counts the differing bits with the
hardware popcount; the weighted counts give sum_i (R - 2 hamming(q_i, k)) exactly. Keys are
never unpacked. The count runs in a compiled loop over the codes in place (native.py, built
on first use with the machine's C compiler), else as a few large numpy calls (numpy's
bitwise_count, 64-bit words where R allows; an even group's two weight-1 planes share a pass).
Similarities are float64, as the reference's, so norm products and block means round the same
way and ties break identically. Attention of one float32 query token runs a compiled online
softmax over the selected blocks, reading K and V in place; other calls (and machines without a
C compiler) gather the selected blocks' tokens and run one fused SDPA over them. No score over
all L keys is formed."""

from __future__ import annotations

import numpy as np
import torch

from .. import register_kernel
from ..common import block_token_index, plane_layout, plane_weights, sign_planes
from ..reference import encode, masked_attention, select_from_similarity
from . import native
from .threads import at_most_one_thread_per_row


def _word_view(codes: np.ndarray) -> np.ndarray:
    """View uint8 codes [..., R/8] as the widest unsigned words that tile a code exactly."""
    for word in (np.uint64, np.uint32, np.uint16):
        if codes.shape[-1] % np.dtype(word).itemsize == 0:
            return codes.view(word)
    return codes


def token_similarity(query: torch.Tensor, key_codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L] float64: sum over the group's query heads of R - 2 * hamming."""
    batch, kv_heads, num_keys, code_bytes = key_codes.shape
    groups = query.shape[1] // kv_heads
    weights, direct = plane_weights(groups), plane_layout(groups)[0]
    planes = sign_planes(encode(query, weight)[:, :, 0], kv_heads)
    top = sum(weights) * code_bytes * 8  # the similarity is top - 2 * sum_p w_p hamming(plane_p, k)
    similarity = native.group_similarity(key_codes, planes, weights, top)
    if similarity is not None:
        return similarity
    similarity = (top - 2 * _numpy_weighted_hamming(key_codes, planes, direct, weights)).astype(np.float64)
    return torch.from_numpy(similarity).reshape(batch, kv_heads, num_keys)


def _numpy_weighted_hamming(key_codes: torch.Tensor, planes: torch.Tensor, direct: int, weights: list) -> np.ndarray:
    """int32 [B * Hkv, L]: sum_p weights[p] * hamming(key, plane_p), in numpy."""
    batch, kv_heads, num_keys, _ = key_codes.shape
    keys = _word_view(key_codes.contiguous().numpy()).reshape(batch * kv_heads, num_keys, -1)
    planes = _word_view(planes.numpy()).reshape(batch * kv_heads, len(weights), 1, -1)
    weighted = np.zeros((batch * kv_heads, num_keys), dtype=np.int32)
    if direct:
        # An even group's two weight-1 planes a, b in one pass: with x = a ^ k, y = b ^ k,
        # popc(x) + popc(y) = popc(a ^ b) + 2 popc(x & y), and a ^ b holds no key.
        first, second = planes[:, 0], planes[:, 1]
        weighted += _popcount_words(first ^ second) + 2 * _popcount_words((keys ^ first) & (keys ^ second))
    for plane in range(2 * direct, len(weights)):
        weighted += weights[plane] * _popcount_words(keys ^ planes[:, plane])
    return weighted


def _popcount_words(words: np.ndarray) -> np.ndarray:
    """[..., W] unsigned words -> int32 [...]: set bits per row of words."""
    counts = np.bitwise_count(words)  # uint8, each <= 64
    total = counts[..., 0].astype(np.uint16)
    for word in range(1, counts.shape[-1]):
        total += counts[..., word]
    return total.astype(np.int32)


def select_blocks(
    query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit=None
):
    similarity = token_similarity(query, key_codes, weight)
    return select_from_similarity(
        similarity, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit
    )


def _gather_rows(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, E], tokens [B, H, S] -> [B, H, S, E]. A contiguous x is read as [B*H*L, E]
    rows by index_select (one row copy per index; advanced indexing and gather copy element by
    element, 4x slower); other layouts by advanced indexing, which needs no copy of x."""
    batch, heads, num_keys, width = x.shape
    if x.is_contiguous():
        starts = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * num_keys
        return x.view(-1, width).index_select(0, (starts + tokens).view(-1)).view(batch, heads, -1, width)
    rows = torch.arange(batch, device=x.device)[:, None, None]
    return x[rows, torch.arange(heads, device=x.device)[None, :, None], tokens]


def gather_selected(key, value, blocks, valid, attn_bias, chunk_size):
    """Keys, values, allowed mask [B, Hkv, 1, k*C] and bias [B, Hkv, 1 or G, k*C] of the selected blocks."""
    batch, kv_heads, num_keys, _ = key.shape
    tokens, allowed = block_token_index(blocks, chunk_size, num_keys)
    keys, values = _gather_rows(key, tokens), _gather_rows(value, tokens)
    if valid is not None:
        allowed = allowed & valid.gather(1, tokens.reshape(batch, -1)).reshape(allowed.shape)
    # Slots outside the attended set (-1 blocks, past the cache, masked keys) hold copies of
    # other tokens; zero them so non-finite values there never reach the output (0 * inf = NaN).
    hidden = ~allowed
    if bool(hidden.any()):
        keys[hidden] = 0
        values[hidden] = 0
    bias = None
    if attn_bias is not None:
        # [B, Hkv, 1 or G, L]: one bias row per KV head, or one per query head of its group.
        q_heads = attn_bias.shape[1]
        per_kv = attn_bias[:, :, 0, :].reshape(batch, -1, max(q_heads // kv_heads, 1), num_keys)
        per_kv = per_kv.expand(batch, kv_heads, -1, -1)
        index = tokens.unsqueeze(2).expand(-1, -1, per_kv.shape[2], -1)
        bias = per_kv.gather(-1, index)
    return keys, values, allowed.unsqueeze(2), bias


def sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap, sinks=None):
    if softcap is None:
        out = native.sparse_attention_f32(query, key, value, blocks, valid, attn_bias, chunk_size, scale, sinks)
        if out is not None:
            return out
    keys, values, allowed, bias = gather_selected(key, value, blocks, valid, attn_bias, chunk_size)
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    if softcap is not None or query.dtype == torch.float64:
        if bias is not None:
            bias = bias.expand(-1, -1, groups, -1).reshape(batch, q_heads, 1, -1)
        return masked_attention(query, keys, values, allowed, bias, scale, softcap, sinks)
    # One fused SDPA call: the G query heads of a KV head are its G query rows.
    mask = allowed if bias is None else bias.to(query.dtype).masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        # A sink is one more slot per row: a zero key (logit 0) whose mask entry is the head's
        # sink logit and whose value is zero, so exp(sink) joins the denominator exactly.
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, float("-inf"))
        sink = sinks.to(query.dtype).reshape(1, kv_heads, groups, 1).expand(batch, -1, -1, -1)
        mask = torch.cat([mask.expand(-1, -1, groups, -1), sink], dim=-1)
        keys = torch.nn.functional.pad(keys, (0, 0, 0, 1))
        values = torch.nn.functional.pad(values, (0, 0, 0, 1))
    grouped = query.reshape(batch, kv_heads, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    # SDPA keeps a NaN query's row NaN (as the spec says) even where no token is allowed; such
    # a row gives zeros.
    return out.masked_fill_(~allowed.any(-1, keepdim=True), 0.0).reshape(batch, q_heads, 1, -1)


register_kernel("encode", "cpu", at_most_one_thread_per_row(encode))
register_kernel("select_blocks", "cpu", at_most_one_thread_per_row(select_blocks))
register_kernel("sparse_attention", "cpu", at_most_one_thread_per_row(sparse_attention))
