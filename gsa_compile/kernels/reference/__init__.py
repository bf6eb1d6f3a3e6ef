"""The reference backend: docs/semantics.md written literally in pure torch.

It is the oracle of every test and serves any call no faster kernel accepts. It scores every
key and forms attention over the whole cache under a mask, so it is exact, not fast."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..common import (
    ceil_div,
    pack_bits,
    projection_dtype,
    resolve_must_select,
    row_block_counts,
    unpack_codes,
)


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] @ W of each head's KV head -> [B, H, L, R] in the projection dtype."""
    batch, heads, length, dim = x.shape
    kv_heads = weight.shape[0]
    dtype = projection_dtype(x)
    # Heads i*G .. i*G+G-1 share weight i: fold them into the length axis, one matmul per KV
    # head (plain matrix products: batched ones stall for milliseconds on busy CPU threads).
    grouped = x.to(dtype).reshape(batch, kv_heads, (heads // kv_heads) * length, dim)
    weight = weight.to(device=x.device, dtype=dtype)
    projected = torch.stack([grouped[:, head] @ weight[head] for head in range(kv_heads)], dim=1)
    return projected.reshape(batch, heads, length, -1)


def encode(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return pack_bits(project(x, weight) >= 0)


def token_similarity(query: torch.Tensor, key_codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L]: sum over the group's query heads of R - 2 * hamming(code(q_i), code(k_j))."""
    batch, kv_heads, num_keys, _ = key_codes.shape
    bits = weight.shape[-1]
    groups = query.shape[1] // kv_heads
    query_bits = unpack_codes(encode(query, weight))[:, :, 0, :]
    query_bits = query_bits.reshape(batch, kv_heads, groups, 1, bits)
    key_bits = unpack_codes(key_codes).unsqueeze(2)
    hamming = (query_bits != key_bits).sum(-1, dtype=torch.int64)
    return (bits - 2 * hamming).sum(2).to(torch.float64)


def block_scores(
    similarity: torch.Tensor, valid: Optional[torch.Tensor], chunk_size: int, repre: str
) -> torch.Tensor:
    """[B, H, L] token scores -> [B, H, n_blocks]; -inf for blocks with no valid token."""
    batch, heads, num_keys = similarity.shape
    n_blocks = ceil_div(num_keys, chunk_size)
    pad = n_blocks * chunk_size - num_keys
    if valid is None and pad == 0:  # every block full and valid: no mask needed
        blocked = similarity.view(batch, heads, n_blocks, chunk_size)
        return {"max": blocked.amax, "min": blocked.amin, "sum": blocked.mean}[repre](-1)
    token_valid = torch.ones(batch, 1, num_keys, dtype=torch.bool, device=similarity.device)
    if valid is not None:
        token_valid = valid[:, None, :].clone()
    scores = F.pad(similarity, (0, pad)).view(batch, heads, n_blocks, chunk_size)
    mask = F.pad(token_valid, (0, pad), value=False).view(batch, 1, n_blocks, chunk_size)
    if repre == "max":
        reduced = scores.masked_fill(~mask, float("-inf")).amax(-1)
    elif repre == "min":
        reduced = scores.masked_fill(~mask, float("inf")).amin(-1)
    else:
        reduced = (scores * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return reduced.masked_fill(~mask.any(-1), float("-inf"))


def top_blocks(
    scores: torch.Tensor,
    must_select: Sequence[int],
    num_blocks: int,
    row_blocks: Optional[torch.Tensor] = None,
    limit: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block scores [B, H, n] (-inf = never) -> int32 [B, H, num_blocks]: must-select blocks
    first, then the best others, ties to the lower index; ascending, -1 padded.
    row_blocks (int [B], default n) is where each row's negative must-select indices count
    from; limit (int [B]) caps how many blocks each row takes."""
    batch, heads, n_blocks = scores.shape
    priority = scores.clone()
    must = must_select_mask(must_select, n_blocks, row_blocks, scores.device)
    priority = torch.where(must & (priority != float("-inf")), float("inf"), priority)
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    taken = order[..., :num_blocks]
    taken_ok = priority.gather(-1, taken) > float("-inf")
    if limit is not None:
        rank = torch.arange(taken.shape[-1], device=scores.device)
        taken_ok = taken_ok & (rank < limit.to(scores.device).reshape(-1, 1, 1))
    chosen = torch.where(taken_ok, taken, n_blocks)
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == n_blocks, -1, chosen)
    if num_blocks > n_blocks:
        chosen = F.pad(chosen, (0, num_blocks - n_blocks), value=-1)
    return chosen.to(torch.int32)


def must_select_mask(
    must_select: Sequence[int], n_blocks: int, row_blocks: Optional[torch.Tensor], device
) -> torch.Tensor:
    """bool [n] (row_blocks None: negatives count from n) or [B, 1, n] (from each row's count)."""
    index = torch.arange(n_blocks, device=device)
    if row_blocks is None:
        hit = torch.zeros(n_blocks, dtype=torch.bool, device=device)
        hit[resolve_must_select(must_select, n_blocks)] = True
        return hit
    rows = row_blocks.to(device).reshape(-1, 1)
    hit = torch.zeros(rows.shape[0], n_blocks, dtype=torch.bool, device=device)
    for block in set(must_select):
        hit = hit | (index == (block if block >= 0 else rows + block))
    return hit[:, None, :]


def select_from_similarity(
    similarity, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit=None
) -> torch.Tensor:
    """Token similarities [B, Hkv, L] -> selection: norm weighting, block scores, scope, top-k.
    Backends that compute similarities their own way share everything after that here."""
    if key_norms is not None:
        similarity = similarity * key_norms.to(similarity.dtype)
    scores = block_scores(similarity, valid, chunk_size, repre)
    if scope == "shared":
        scores = scores.amax(dim=1, keepdim=True).expand_as(scores)
    row_blocks = row_block_counts(valid, similarity.shape[-1], chunk_size)
    return top_blocks(scores, must_select, num_blocks, row_blocks, limit)


def select_blocks(
    query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit=None
) -> torch.Tensor:
    similarity = token_similarity(query, key_codes, weight)
    return select_from_similarity(
        similarity, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit
    )


def selected_token_mask(blocks: torch.Tensor, chunk_size: int, num_keys: int) -> torch.Tensor:
    """int32 [B, H, k] -> bool [B, H, L], True for tokens of selected blocks."""
    batch, heads, _ = blocks.shape
    n_blocks = ceil_div(num_keys, chunk_size)
    chosen = torch.zeros(batch, heads, n_blocks + 1, dtype=torch.bool, device=blocks.device)
    chosen.scatter_(-1, torch.where(blocks < 0, n_blocks, blocks).to(torch.int64), True)
    return chosen[..., :n_blocks].repeat_interleave(chunk_size, dim=-1)[..., :num_keys]


def masked_attention(
    query, key, value, allowed, bias, scale: Optional[float], softcap: Optional[float],
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact softmax attention; allowed [B, Hkv|1, T|1, L] bool, bias broadcastable to
    [B, Hq, T, L]. Non-finite inputs propagate as in SDPA, except that keys and values no query
    of a row may attend are not read; a row with no attendable key returns zeros (as SDPA).
    sinks [Hq]: a logit per query head that joins each row's softmax with a zero value (the
    weights over the keys then sum to less than 1), as transformers' eager attention with sinks."""
    batch, q_heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = dim ** -0.5 if scale is None else scale
    q = query.to(dtype).reshape(batch, kv_heads, groups, queries, dim)
    logits = torch.einsum("bhgtd,bhld->bhgtl", q, key.to(dtype)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:
        bias = bias.to(dtype).expand(batch, q_heads, queries, key.shape[2])
        logits = logits + bias.reshape(batch, kv_heads, groups, queries, key.shape[2])
    value = value.to(dtype)
    if allowed is not None:
        allowed = allowed.expand(batch, kv_heads, queries, key.shape[2])
        # masked_fill, not an added -inf: a NaN key that is masked out must not reach the output.
        logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        # 0 * inf is NaN: values no query attends are zeroed so they are never read.
        value = value.masked_fill(~allowed.any(dim=2).unsqueeze(-1), 0.0)
    # softmax of a row of -inf is NaN; SDPA gives zeros there. A NaN logit (a NaN query or an
    # attended NaN key) keeps the row NaN, as in SDPA.
    if sinks is not None:
        # The sink is one more logit of each row; its (zero) value adds nothing to the output.
        sink = sinks.to(device=logits.device, dtype=dtype).reshape(1, kv_heads, groups, 1, 1)
        logits = torch.cat([logits, sink.expand(*logits.shape[:-1], 1)], dim=-1)
        weights = torch.softmax(logits, dim=-1)[..., :-1]
    else:
        empty = (logits == float("-inf")).all(dim=-1, keepdim=True)
        weights = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhgtl,bhlv->bhgtv", weights, value)
    return out.reshape(batch, q_heads, queries, value.shape[-1]).to(query.dtype)


def sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap, sinks=None) -> torch.Tensor:
    allowed = selected_token_mask(blocks, chunk_size, key.shape[2]).unsqueeze(2)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    return masked_attention(query, key, value, allowed, attn_bias, scale, softcap, sinks)


def dense_attention(query, key, value, attn_mask, is_causal: bool, scale, softcap) -> torch.Tensor:
    """Dense attention with SDPA's semantics (bool masks keep True, additive masks add,
    is_causal is top-left aligned), plus an optional tanh softcap."""
    from ..common import mask_to_4d

    queries, num_keys = query.shape[2], key.shape[2]
    allowed, bias = None, None
    if attn_mask is not None:
        mask = mask_to_4d(attn_mask)
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            bias = mask
    if is_causal:
        causal = torch.ones(queries, num_keys, dtype=torch.bool, device=query.device).tril()
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None and allowed.shape[1] not in (1, key.shape[1]):
        bias = _bool_to_bias(allowed) if bias is None else bias.masked_fill(~allowed, float("-inf"))
        allowed = None
    return masked_attention(query, key, value, allowed, bias, scale, softcap)


def _bool_to_bias(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, float("-inf"))
