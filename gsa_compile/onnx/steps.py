"""docs/semantics.md, step by step, as ONNX standard ops: the pieces every gsa reference function
is assembled from. Each step takes an Emitter and value names and returns value names.

Precision follows the reference kernels: hash projections and attention in float32, block
scores in float64 (token similarities are exact integers; key-norm products and means are not)."""

from __future__ import annotations

import numpy as np

from .builder import DOUBLE, FLOAT, INT32, INT64, INT64_MAX, UINT8, Emitter


# ------------------------------------------------------------------ hashing
def projection(e: Emitter, x: str, weight: str) -> str:
    """x [B, H, L, D], weight [Hkv, D, R] -> float32 [B, Hkv, G, L, R]: head i projects with weight i // G."""
    grouped = e.reshape(e.cast(x, FLOAT), e.dims(x, 0, 1), e.dims(weight, 0, 1), e.ints(-1), e.dims(x, 2, 4))
    per_head = e.unsqueeze(e.cast(weight, FLOAT), 1)
    return e.op("MatMul", grouped, per_head)


def encode(e: Emitter, x: str, weight: str) -> str:
    """uint8 [B, H, L, R/8]: bit i of byte b is (x @ W)[8b + i] >= 0."""
    bits = e.cast(e.op("GreaterOrEqual", projection(e, x, weight), e.const(0.0, np.float32)), INT32)
    bytes_of_bits = e.reshape(bits, e.dims(x, 0, 3), e.ints(-1, 8))
    weighted = e.op("Mul", bytes_of_bits, e.const([1 << i for i in range(8)], np.int32))
    return e.cast(e.reduce("ReduceSum", weighted, [-1]), UINT8)


def byte_bit_table(e: Emitter) -> str:
    """float32 [8, 256]: entry [i, v] is bit i of byte value v (BitShift + BitwiseAnd)."""
    values = e.const(np.arange(256)[None, :], np.uint8)
    shifts = e.const(np.arange(8)[:, None], np.uint8)
    bits = e.op("BitwiseAnd", e.op("BitShift", values, shifts, direction="RIGHT"), e.const(1, np.uint8))
    return e.cast(bits, FLOAT)


def token_similarity(e: Emitter, query: str, key_codes: str, weight: str, key_norms: str) -> str:
    """float64 [B, Hkv, L]: sum over the group's query heads of the +-1 dot product of codes
    (R - 2 * hamming), times key_norms.

    With Q[r] the group's sum of +-1 query bits and b[r] a key's 0/1 bits, the similarity is
    2 * sum_r Q[r] b[r] - sum_r Q[r]. The first sum is read byte by byte from a per-query table
    T[j, v] = sum_i Q[8j + i] * bit_i(v), so the codes are never unpacked (8x fewer elements
    than a bit-level product). Every value is a small integer: float32 is exact."""
    query_bits = e.where(
        e.op("GreaterOrEqual", projection(e, query, weight), e.const(0.0, np.float32)),
        e.const(1.0, np.float32), e.const(-1.0, np.float32),
    )
    group_sum = e.reduce("ReduceSum", query_bits, [2])  # [B, Hkv, 1, R]
    heads, code_bytes = e.dims(key_codes, 0, 2), e.dims(key_codes, 3, 4)
    per_byte = e.reshape(group_sum, heads, code_bytes, e.ints(8))  # [B, Hkv, R/8, 8]
    table = e.reshape(e.op("MatMul", per_byte, byte_bit_table(e)), heads, e.ints(-1))  # [B, Hkv, R/8 * 256]
    offsets = e.op("Mul", e.cast(e.arange(code_bytes), INT32), e.const(256, np.int32))
    index = e.reshape(e.op("Add", e.cast(key_codes, INT32), offsets), heads, e.ints(-1))  # [B, Hkv, L * R/8]
    picked = e.reshape(e.op("GatherElements", table, index, axis=2), e.dims(key_codes, 0, 4))
    matches = e.reduce("ReduceSum", picked, [-1])  # [B, Hkv, L]
    total = e.reduce("ReduceSum", group_sum, [-1])  # [B, Hkv, 1]
    similarity = e.op("Sub", e.op("Mul", matches, e.const(2.0, np.float32)), total)
    return e.op("Mul", e.cast(similarity, DOUBLE), e.cast(key_norms, DOUBLE))


# ------------------------------------------------------------------ blocks and budget
def num_blocks(e: Emitter, num_keys: str, chunk: str) -> str:
    """int64 [1]: ceil(L / C)."""
    return e.op("Div", e.op("Add", num_keys, e.op("Sub", chunk, e.ints(1))), chunk)


def block_scores(e: Emitter, similarity: str, valid: str, chunk: str, n_blocks: str, repre: str, scope: str) -> str:
    """float64 [B, Hkv, n]: each block's score from its valid tokens by repre (max, min, or
    mean for sum); -inf for a block without a valid token; 'shared' scope: max over KV heads."""
    num_keys = e.dims(similarity, 2, 3)
    pad = e.op("Sub", e.op("Mul", n_blocks, chunk), num_keys)
    scores = e.op("Pad", similarity, e.cat(e.ints(0, 0, 0, 0, 0), pad))
    scores = e.reshape(scores, e.dims(similarity, 0, 2), n_blocks, chunk)  # [B, H, n, C]
    token_valid = e.op("Pad", e.cast(valid, DOUBLE), e.cat(e.ints(0, 0, 0), pad))
    token_valid = e.reshape(token_valid, e.dims(valid, 0, 1), e.ints(1), n_blocks, chunk)  # [B, 1, n, C]
    is_valid = e.op("Greater", token_valid, e.const(0.0, np.float64))
    inf, minus_inf = e.const(np.inf, np.float64), e.const(-np.inf, np.float64)
    best = e.reduce("ReduceMax", e.where(is_valid, scores, minus_inf), [-1])
    worst = e.reduce("ReduceMin", e.where(is_valid, scores, inf), [-1])
    count = e.reduce("ReduceSum", token_valid, [-1])
    mean = e.op("Div", e.reduce("ReduceSum", e.op("Mul", scores, token_valid), [-1]),
                e.op("Max", count, e.const(1.0, np.float64)))
    chosen = e.where(
        e.op("Equal", repre, e.const("max", object)), best,
        e.where(e.op("Equal", repre, e.const("min", object)), worst, mean),
    )
    reduced = e.where(e.op("Greater", count, e.const(0.0, np.float64)), chosen, minus_inf)
    shared = e.reduce("ReduceMax", reduced, [1], keepdims=1)
    return e.where(e.op("Equal", scope, e.const("shared", object)), shared, reduced)


def must_select_mask(e: Emitter, must_select: str, n_blocks: str) -> str:
    """bool [n]: blocks named by must_select (negatives from the end), inside the cache, once each."""
    resolved = e.where(e.op("Less", must_select, e.ints(0)), e.op("Add", must_select, n_blocks), must_select)
    inside = e.op("And", e.op("GreaterOrEqual", resolved, e.ints(0)), e.op("Less", resolved, n_blocks))
    block_ids = e.arange(n_blocks)
    hits = e.op("And", e.op("Equal", e.unsqueeze(resolved, 1), e.unsqueeze(block_ids, 0)), e.unsqueeze(inside, 1))
    # A sum, not a max: it is well defined (zero) for an empty must_select list.
    return e.op("Greater", e.reduce("ReduceSum", e.cast(hits, INT32), [0]), e.const(0, np.int32))


def budget(e: Emitter, n_blocks: str, chunk: str, ratio: str, budget_tokens: str, must: str) -> str:
    """int64 [1]: k = ceil(budget_tokens / C) or ceil(round(ratio * n, 9)), clamped to [#must, n]."""
    by_tokens = e.op("Div", e.op("Add", budget_tokens, e.op("Sub", chunk, e.ints(1))), chunk)
    product = e.op("Mul", e.cast(n_blocks, DOUBLE), ratio)
    billion = e.const(1e9, np.float64)
    rounded = e.op("Div", e.op("Round", e.op("Mul", product, billion)), billion)
    by_ratio = e.cast(e.op("Ceil", rounded), INT64)
    k = e.where(e.op("Greater", budget_tokens, e.ints(0)), by_tokens, by_ratio)
    floor = e.reduce("ReduceSum", e.cast(must, INT64), [0], keepdims=1)
    return e.op("Max", floor, e.op("Min", k, n_blocks))


def top_blocks(e: Emitter, scores: str, must: str, k: str, n_blocks: str) -> str:
    """int32 [B, H, k]: must-select blocks that have a valid token, then the highest others
    (ONNX TopK breaks ties to the lower index); ascending, -1 for slots no valid block fills."""
    minus_inf = e.const(-np.inf, np.float64)
    selectable = e.op("Greater", scores, minus_inf)
    priority = e.where(e.op("And", must, selectable), e.const(np.inf, np.float64), scores)
    values, indices = e.op("TopK", priority, k, outputs=2, axis=-1, largest=1, sorted=1)
    kept = e.where(e.op("Greater", values, minus_inf), indices, n_blocks)
    ascending, _ = e.op("TopK", kept, k, outputs=2, axis=-1, largest=0, sorted=1)
    blocks = e.where(e.op("Equal", ascending, n_blocks), e.ints(-1), ascending)
    return e.cast(blocks, INT32)


def pad_blocks(e: Emitter, blocks: str, width: str) -> str:
    """int32 [B, H, k] -> [B, H, width] padded with -1."""
    missing = e.op("Sub", width, e.dims(blocks, 2, 3))
    return e.op("Pad", blocks, e.cat(e.ints(0, 0, 0, 0, 0), missing), e.const(-1, np.int32))


def every_block(e: Emitter, key: str, n_blocks: str) -> str:
    """int32 [B, Hkv, n]: 0..n-1 in every row (the selection of a call that ran dense)."""
    ids = e.cast(e.arange(n_blocks), INT32)
    return e.op("Expand", ids, e.cat(e.dims(key, 0, 2), n_blocks))


# ------------------------------------------------------------------ masks
def last_token(e: Emitter, x: str) -> str:
    """x [B, H, T, ...] -> [B, H, 1, ...]: the last query token (or mask row)."""
    return e.op("Slice", x, e.ints(-1), e.ints(INT64_MAX), e.ints(2))


def valid_keys(e: Emitter, attn_mask: str, query: str, num_keys: str) -> str:
    """bool [B, L]: keys that some query head may attend in the last mask row (above -inf).
    Read from the mask as given: broadcasting it over heads first would change no value."""
    row = last_token(e, attn_mask)
    allowed = e.op("Greater", row, e.op("CastLike", e.const(-np.inf, np.float32), row))
    any_head = e.reduce("ReduceMax", e.cast(allowed, INT32), [1, 2])
    return e.op("Expand", e.op("Greater", any_head, e.const(0, np.int32)), e.cat(e.dims(query, 0, 1), num_keys))


# ------------------------------------------------------------------ attention
def softcap_logits(e: Emitter, logits: str, softcap: str) -> str:
    """softcap * tanh(logits / softcap) where softcap > 0, else the logits unchanged."""
    capped = e.op("Greater", softcap, e.const(0.0, np.float32))
    safe = e.where(capped, softcap, e.const(1.0, np.float32))
    squashed = e.op("Mul", e.op("Tanh", e.op("Div", logits, safe)), safe)
    return e.where(capped, squashed, logits)


def softmax_or_zero(e: Emitter, logits: str) -> str:
    """Softmax over the last axis; a row with no allowed key (all -inf) gives zeros."""
    weights = e.op("Softmax", logits, axis=-1)
    return e.where(e.op("IsNaN", weights), e.const(0.0, np.float32), weights)


def gather_tokens(e: Emitter, x: str, tokens: str) -> str:
    """x [B, H, L, E], tokens int64 [B, H, S] -> [B, H, S, E]: whole E-long rows gathered from
    x viewed as [B * H * L, E] (one index per row, not one per element)."""
    rows = e.op("Mul", e.dims(x, 0, 1), e.dims(x, 1, 2))
    num_keys = e.dims(x, 2, 3)
    row_start = e.op("Mul", e.reshape(e.arange(rows), e.dims(tokens, 0, 2), e.ints(1)), num_keys)  # [B, H, 1]
    flat_x = e.reshape(x, e.ints(-1), e.dims(x, 3, 4))
    return e.op("Gather", flat_x, e.op("Add", tokens, row_start), axis=0)


def selected_tokens(e: Emitter, blocks: str, chunk: str, num_keys: str):
    """blocks int32 [B, Hkv, k] -> (token index int64 [B, Hkv, k*C] clamped into the cache,
    bool [B, Hkv, k*C] True for real tokens of selected blocks)."""
    starts = e.unsqueeze(e.cast(blocks, INT64), -1)
    offsets = e.arange(chunk)
    tokens = e.op("Add", e.op("Mul", starts, chunk), offsets)  # [B, Hkv, k, C]
    in_range = e.op("And", e.op("GreaterOrEqual", starts, e.ints(0)), e.op("Less", tokens, num_keys))
    clamped = e.op("Max", e.op("Min", tokens, e.op("Sub", num_keys, e.ints(1))), e.ints(0))
    flat = e.cat(e.dims(blocks, 0, 2), e.ints(-1))
    return e.reshape(clamped, flat), e.reshape(in_range, flat)


def _if_wide(e: Emitter, size: str, index: str) -> str:
    """index where the broadcast dim `size` is > 1, else 0 (its one entry serves every index)."""
    return e.op("Mul", index, e.op("Min", e.op("Sub", size, e.ints(1)), e.ints(1)))


def selected_bias(e: Emitter, bias: str, query: str, key: str, tokens: str) -> str:
    """bias broadcastable to [B, Hq, 1, L], tokens int64 [B, Hkv, S] -> [B, Hkv, G, S]: each query
    head's bias at its KV head's selected tokens, read from the bias as given (never broadcast
    to [B, Hq, L] first)."""
    row = e.op("Expand", bias, e.ints(1, 1, 1, 1))  # rank 4, the dims it has
    heads, length = e.dims(row, 1, 2), e.dims(row, 3, 4)
    batch = e.reshape(e.arange(e.dims(query, 0, 1)), e.ints(-1, 1, 1, 1))  # [B, 1, 1, 1]
    q_heads = e.reshape(e.arange(e.dims(query, 1, 2)), e.dims(key, 1, 2), e.ints(-1, 1))  # [Hkv, G, 1]
    index = e.op("Add", e.op("Mul", _if_wide(e, e.dims(row, 0, 1), batch), e.op("Mul", heads, length)),
                 e.op("Mul", _if_wide(e, heads, q_heads), length))
    index = e.op("Add", index, _if_wide(e, length, e.unsqueeze(tokens, 2)))
    return e.op("Gather", e.reshape(row, e.ints(-1)), index, axis=0)


def sparse_attention(
    e: Emitter, query: str, key: str, value: str, blocks: str, valid: str, bias: str,
    chunk: str, scale: str, softcap: str,
) -> str:
    """[B, Hq, 1, Dv]: gather the selected blocks' keys and values, exact softmax attention."""
    num_keys = e.dims(key, 2, 3)
    tokens, in_range = selected_tokens(e, blocks, chunk, num_keys)
    keys = e.op("Transpose", e.cast(gather_tokens(e, key, tokens), FLOAT), perm=[0, 1, 3, 2])
    values = e.cast(gather_tokens(e, value, tokens), FLOAT)
    grouped_query = e.reshape(e.cast(query, FLOAT), e.dims(key, 0, 2), e.ints(-1), e.dims(query, 3, 4))
    logits = e.op("Mul", e.op("MatMul", grouped_query, keys), scale)  # [B, Hkv, G, S]
    logits = softcap_logits(e, logits, softcap)
    logits = e.op("Add", logits, e.cast(selected_bias(e, bias, query, key, tokens), FLOAT))
    batch_start = e.op("Mul", e.reshape(e.arange(e.dims(query, 0, 1)), e.ints(-1, 1, 1)), num_keys)  # [B, 1, 1]
    flat_valid = e.reshape(e.op("Expand", valid, e.cat(e.dims(query, 0, 1), num_keys)), e.ints(-1))
    allowed = e.op("And", in_range, e.op("Gather", flat_valid, e.op("Add", tokens, batch_start), axis=0))
    logits = e.where(e.unsqueeze(allowed, 2), logits, e.const(-np.inf, np.float32))
    out = e.op("MatMul", softmax_or_zero(e, logits), values)  # [B, Hkv, G, Dv]
    return e.op("CastLike", e.reshape(out, e.dims(query, 0, 3), e.ints(-1)), query)


def dense_attention(
    e: Emitter, query: str, key: str, value: str, attn_mask: str, is_causal: str, scale: str, softcap: str,
) -> str:
    """[B, Hq, T, Dv]: exact attention over the whole cache with SDPA's mask and is_causal rules."""
    num_keys, queries = e.dims(key, 2, 3), e.dims(query, 2, 3)
    grouped_query = e.reshape(e.cast(query, FLOAT), e.dims(key, 0, 2), e.ints(-1), e.dims(query, 2, 4))
    keys = e.op("Transpose", e.unsqueeze(e.cast(key, FLOAT), 2), perm=[0, 1, 2, 4, 3])
    logits = e.op("Mul", e.op("MatMul", grouped_query, keys), scale)  # [B, Hkv, G, T, L]
    logits = softcap_logits(e, logits, softcap)
    full_mask = e.op("Expand", attn_mask, e.cat(e.dims(query, 0, 3), num_keys))
    grouped_mask = e.reshape(full_mask, e.dims(key, 0, 2), e.ints(-1), queries, num_keys)
    logits = e.op("Add", logits, e.cast(grouped_mask, FLOAT))
    rows = e.arange(queries)
    cols = e.arange(num_keys)
    future = e.op("Greater", e.unsqueeze(cols, 0), e.unsqueeze(rows, 1))  # top-left aligned, as SDPA
    logits = e.where(e.op("And", future, is_causal), e.const(-np.inf, np.float32), logits)
    values = e.unsqueeze(e.cast(value, FLOAT), 2)
    out = e.op("MatMul", softmax_or_zero(e, logits), values)  # [B, Hkv, G, T, Dv]
    return e.op("CastLike", e.reshape(out, e.dims(query, 0, 3), e.ints(-1)), query)


def runs_dense(
    e: Emitter, query: str, num_keys: str, valid: str, is_causal: str, seq_len_threshold: str,
    concurrency_threshold: str,
) -> str:
    """bool [1]: docs/semantics.md rule 10's dense fallback for this call."""
    prefill = e.op("Greater", e.dims(query, 2, 3), e.ints(1))
    causal = e.op("And", is_causal, e.op("Greater", num_keys, e.ints(1)))
    short = e.op("Less", num_keys, seq_len_threshold)
    long_rows = e.op("GreaterOrEqual", e.reduce("ReduceSum", e.cast(valid, INT64), [1]), seq_len_threshold)
    rows = e.reduce("ReduceSum", e.cast(long_rows, INT64), [0], keepdims=1)
    few = e.op("And", e.op("Greater", concurrency_threshold, e.ints(0)), e.op("Less", rows, concurrency_threshold))
    return e.op("Or", e.op("Or", prefill, causal), e.op("Or", short, few))
