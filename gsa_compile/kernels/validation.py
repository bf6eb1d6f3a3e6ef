"""Checks every GSA op runs before any backend sees its inputs. Each error names the argument
and what is allowed.

Shape, dtype and option checks also run on fake tensors while tracing. Checks of tensor values
(block ids) read the data, so they run only where that is free: on real CPU tensors inside the
ops, and at the functional API's entry (never inside a traced graph or a CUDA graph capture)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from ..errors import GSAInputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REPRE_METHODS = ("max", "min", "sum")
SCOPES = ("per_head", "shared")


def _require(condition: bool, message) -> None:
    """message: a string, or a function that makes it (formatted only when the check fails:
    these checks run on every decode call)."""
    if not condition:
        raise GSAInputError(message() if callable(message) else message)


def check_tensor(name: str, t) -> None:
    _require(isinstance(t, torch.Tensor), lambda: f"{name} must be a tensor, got {type(t).__name__}")


def _float_tensor(name: str, t: torch.Tensor, dims: int) -> None:
    check_tensor(name, t)
    _require(t.dtype in FLOAT_DTYPES, lambda: f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    _require(t.dim() == dims, lambda: f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


def check_weight(weight: torch.Tensor, head_dim: int, kv_heads: Optional[int] = None) -> None:
    _float_tensor("weight", weight, 3)
    _require(
        weight.shape[1] == head_dim,
        lambda: f"weight is [kv_heads, head_dim, hash_bits] = {tuple(weight.shape)} but the vectors it "
        f"hashes have {head_dim} dims",
    )
    _require(weight.shape[2] % 8 == 0 and weight.shape[2] > 0,
             lambda: f"weight's hash_bits ({weight.shape[2]}) must be a positive multiple of 8")
    if kv_heads is not None:
        _require(weight.shape[0] == kv_heads,
                 lambda: f"weight has {weight.shape[0]} heads but keys have {kv_heads} KV heads")


def check_encode(x: torch.Tensor, weight: torch.Tensor) -> None:
    _float_tensor("x", x, 4)
    _require(x.numel() > 0, lambda: f"x must hold at least one vector to encode, got shape {tuple(x.shape)}")
    check_weight(weight, x.shape[-1])
    _require(
        x.shape[1] % weight.shape[0] == 0,
        lambda: f"x has {x.shape[1]} heads, not a multiple of the weight's {weight.shape[0]} KV heads",
    )


def check_query_keys(query: torch.Tensor, kv_heads: int, num_keys: int, what: str) -> None:
    _float_tensor("query", query, 4)
    _require(query.shape[2] == 1, lambda: f"{what} takes one query token per row (decode), got T={query.shape[2]}")
    _require(
        kv_heads > 0 and query.shape[1] % kv_heads == 0,
        lambda: f"query heads ({query.shape[1]}) must be a multiple of KV heads ({kv_heads})",
    )
    _require(num_keys > 0, lambda: f"{what} needs at least one key, got L=0")


def check_valid(valid: Optional[torch.Tensor], batch: int, num_keys: int) -> None:
    if valid is None:
        return
    check_tensor("valid", valid)
    _require(valid.dtype == torch.bool, lambda: f"valid must be a bool tensor, got {valid.dtype}")
    _require(tuple(valid.shape) == (batch, num_keys),
             lambda: f"valid must be [B, L] = {(batch, num_keys)}, got {tuple(valid.shape)}")


def check_select(
    query, key_codes, weight, valid, key_norms, chunk_size: int, num_blocks: int,
    must_select: Sequence[int], repre: str, scope: str,
) -> None:
    _require(isinstance(key_codes, torch.Tensor) and key_codes.dtype == torch.uint8 and key_codes.dim() == 4,
             lambda: f"key_codes must be uint8 [B, Hkv, L, R/8], got {getattr(key_codes, 'dtype', None)} "
             f"{tuple(getattr(key_codes, 'shape', ()))}")
    batch, kv_heads, num_keys, code_bytes = key_codes.shape
    check_query_keys(query, kv_heads, num_keys, "select_blocks")
    _require(query.shape[0] == batch, lambda: f"query batch {query.shape[0]} != key_codes batch {batch}")
    check_weight(weight, query.shape[-1], kv_heads)
    _require(weight.shape[2] == 8 * code_bytes,
             lambda: f"key_codes hold {8 * code_bytes} bits per key but the weight makes {weight.shape[2]}")
    check_valid(valid, batch, num_keys)
    check_key_norms(key_norms, batch, kv_heads, num_keys)
    check_chunk(chunk_size)
    check_choice("repre", repre, REPRE_METHODS)
    check_choice("scope", scope, SCOPES)
    _require(is_int(num_blocks) and num_blocks >= 1, lambda: f"num_blocks must be an integer >= 1, got {num_blocks!r}")
    check_must_select(must_select)
    from .common import ceil_div, resolve_must_select

    must = resolve_must_select(must_select, ceil_div(num_keys, chunk_size))
    _require(
        num_blocks >= len(must),
        lambda: f"num_blocks={num_blocks} is smaller than the {len(must)} must-select blocks {must}; "
        f"must-select blocks count inside the budget",
    )


def is_int(value) -> bool:
    # A SymInt is a size under torch.compile's dynamic shapes (a cache length that changed).
    return type(value) is int or (isinstance(value, (Integral, torch.SymInt)) and not isinstance(value, bool))


def check_chunk(chunk_size: int) -> None:
    _require(is_int(chunk_size) and chunk_size > 0,
             lambda: f"chunk_size must be a positive integer, got {chunk_size!r}")


def check_choice(name: str, value, allowed: Sequence[str]) -> None:
    _require(value in allowed, lambda: f"{name} must be one of {list(allowed)}, got {value!r}")


def check_key_norms(key_norms, batch: int, kv_heads: int, num_keys: int) -> None:
    if key_norms is None:
        return
    check_tensor("key_norms", key_norms)
    _require(key_norms.dtype in FLOAT_DTYPES and tuple(key_norms.shape) == (batch, kv_heads, num_keys),
             lambda: f"key_norms must be a float [B, Hkv, L] = {(batch, kv_heads, num_keys)} tensor, got "
             f"{key_norms.dtype} {tuple(key_norms.shape)}")


def check_must_select(must_select) -> None:
    _require(
        isinstance(must_select, (list, tuple)) and all(is_int(block) for block in must_select),
        lambda: "must_select must be a list of block indices (integers: non-negative count from the start, "
        f"negative from the end; () for none), got {must_select!r}",
    )


def check_budget(top_k_ratio, budget_tokens) -> None:
    """Exactly one of a ratio (a finite number > 0; >= 1 keeps every block) and a token budget
    (an integer >= 1)."""
    _require(
        (top_k_ratio is None) != (budget_tokens is None),
        lambda: f"give exactly one of top_k_ratio and budget_tokens, got top_k_ratio={top_k_ratio!r}, "
        f"budget_tokens={budget_tokens!r}",
    )
    if budget_tokens is not None:
        _require(is_int(budget_tokens) and budget_tokens >= 1,
                 lambda: f"budget_tokens must be an integer >= 1 (tokens attended per row), got {budget_tokens!r}")
    else:
        _require(
            isinstance(top_k_ratio, Real) and not isinstance(top_k_ratio, bool)
            and math.isfinite(top_k_ratio) and top_k_ratio > 0,
            lambda: f"top_k_ratio must be a finite number > 0 (the share of blocks attended; >= 1 attends "
            f"every block), got {top_k_ratio!r}",
        )


def _check_threshold(name: str, value) -> None:
    _require(is_int(value) and value >= 0, lambda: f"{name} must be an integer >= 0, got {value!r}")


def check_attn_mask(attn_mask, query: torch.Tensor, num_keys: int) -> None:
    """A mask SDPA takes: bool (True attends) or float (added to the logits), broadcastable to
    [B, Hq, T, L]."""
    if attn_mask is None:
        return
    check_tensor("attn_mask", attn_mask)
    _require(attn_mask.dtype == torch.bool or attn_mask.dtype in FLOAT_DTYPES,
             lambda: f"attn_mask must be bool (True attends) or float (added to the logits), got {attn_mask.dtype}")
    target = (query.shape[0], query.shape[1], query.shape[2], num_keys)
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    _require(
        attn_mask.dim() <= 4 and all(size in (1, want) for size, want in zip(shape, target)),
        lambda: f"attn_mask {tuple(attn_mask.shape)} must broadcast to [B, Hq, T, L] = {target} "
        f"(each dim that size or 1)",
    )


def check_attention_inputs(query, key, value) -> None:
    _float_tensor("query", query, 4)
    _float_tensor("key", key, 4)
    _float_tensor("value", value, 4)
    _require(query.dtype == key.dtype == value.dtype,
             lambda: f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    _require(query.shape[0] == key.shape[0] == value.shape[0],
             lambda: f"batch sizes differ: query {query.shape[0]}, key {key.shape[0]}, value {value.shape[0]}")
    _require(key.shape[1] == value.shape[1] and key.shape[2] == value.shape[2],
             lambda: f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree on heads and length")
    _require(query.shape[-1] == key.shape[-1],
             lambda: f"query head dim {query.shape[-1]} != key head dim {key.shape[-1]}")
    _require(
        key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0,
        lambda: f"query heads ({query.shape[1]}) must be a multiple of KV heads ({key.shape[1]})",
    )
    _require(query.device == key.device == value.device,
             lambda: f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    _require(query.numel() > 0 and key.shape[2] > 0,
             lambda: f"attention needs at least one batch row, head, query and key, got query "
             f"{tuple(query.shape)} and key {tuple(key.shape)}")


def check_attention_site(
    query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale, softcap,
    chunk_size, top_k_ratio, budget_tokens, must_select, repre, scope, seq_len_threshold, concurrency_threshold,
) -> None:
    """Every argument of gsa::attention (shapes and options only, so it runs while tracing)."""
    check_attention_inputs(query, key, value)
    check_weight(weight, key.shape[-1], key.shape[1])
    check_key_codes(key_codes, key, weight)
    check_attn_mask(attn_mask, query, key.shape[2])
    check_key_norms(key_norms, key.shape[0], key.shape[1], key.shape[2])
    check_budget(top_k_ratio, budget_tokens)
    check_must_select(must_select)
    check_site_options(chunk_size, repre, scope, is_causal, scale, softcap, seq_len_threshold, concurrency_threshold)
    if reuse_blocks is not None:
        n_blocks = -(-key.shape[2] // chunk_size)
        expected = (key.shape[0], key.shape[1], n_blocks)
        _require(
            isinstance(reuse_blocks, torch.Tensor) and reuse_blocks.dtype in (torch.int32, torch.int64)
            and tuple(reuse_blocks.shape) == expected,
            lambda: f"reuse_blocks must be the int32 {list(expected)} selection another layer returned, got "
            f"{getattr(reuse_blocks, 'dtype', type(reuse_blocks).__name__)} "
            f"{tuple(getattr(reuse_blocks, 'shape', ()))}",
        )


def check_site_options(
    chunk_size, repre, scope, is_causal, scale, softcap, seq_len_threshold, concurrency_threshold
) -> None:
    """The scalar options of gsa::attention. The functional API checks them before the op's
    schema converts them (True would become chunk_size 1, None is_causal False)."""
    check_chunk(chunk_size)
    check_choice("repre", repre, REPRE_METHODS)
    check_choice("scope", scope, SCOPES)
    _require(isinstance(is_causal, bool), lambda: f"is_causal must be a bool, got {is_causal!r}")
    check_scale_softcap(scale, softcap)
    _check_threshold("seq_len_threshold", seq_len_threshold)
    _check_threshold("concurrency_threshold", concurrency_threshold)


def check_scale_softcap(scale, softcap) -> None:
    _require(scale is None or (isinstance(scale, Real) and not isinstance(scale, bool)),
             lambda: f"scale must be a number or None (1 / sqrt(head dim)), got {scale!r}")
    _require(
        softcap is None or (isinstance(softcap, Real) and not isinstance(softcap, bool)
                            and math.isfinite(softcap) and softcap > 0),
        lambda: f"softcap must be a finite number > 0 or None, got {softcap!r}",
    )


def check_sinks(sinks, query: torch.Tensor) -> None:
    """Attention sinks: one logit per query head (float [Hq]) whose exp joins each softmax
    denominator, as transformers' `s_aux` / `sinks` (gpt-oss and others)."""
    if sinks is None:
        return
    check_tensor("sinks", sinks)
    _require(
        sinks.dtype in FLOAT_DTYPES and tuple(sinks.shape) == (query.shape[1],),
        f"sinks must be a float [Hq] = [{query.shape[1]}] tensor (one sink logit per query head), got "
        f"{sinks.dtype} {tuple(sinks.shape)}",
    )
    _require(sinks.device == query.device, f"sinks must be on the query's device {query.device}, got {sinks.device}")


def check_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size: int, sinks=None) -> None:
    check_attention_inputs(query, key, value)
    check_sinks(sinks, query)
    check_query_keys(query, key.shape[1], key.shape[2], "sparse_attention")
    _require(
        isinstance(blocks, torch.Tensor) and blocks.dtype in (torch.int32, torch.int64) and blocks.dim() == 3
        and tuple(blocks.shape[:2]) == (key.shape[0], key.shape[1]),
        lambda: f"blocks must be int32 [B, Hkv, k] = [{key.shape[0]}, {key.shape[1]}, k], got "
        f"{getattr(blocks, 'dtype', None)} {tuple(getattr(blocks, 'shape', ()))}",
    )
    check_valid(valid, key.shape[0], key.shape[2])
    if attn_bias is not None:
        check_tensor("attn_bias", attn_bias)
        _require(
            attn_bias.dtype in FLOAT_DTYPES,
            lambda: f"attn_bias must be a float tensor added to the logits, got {attn_bias.dtype}; pass a bool "
            f"mask of the keys to attend as valid [B, L], or as attn_bias = zeros.masked_fill(~mask, -inf)",
        )
        _require(
            attn_bias.dim() == 4 and attn_bias.shape[0] == key.shape[0] and attn_bias.shape[1] in (1, query.shape[1])
            and attn_bias.shape[2] == 1 and attn_bias.shape[3] == key.shape[2],
            lambda: f"attn_bias must be [B, 1 or Hq, 1, L], got {tuple(attn_bias.shape)}",
        )
    check_chunk(chunk_size)
    if blocks.device.type == "cpu" and not is_fake(blocks):
        check_block_values(blocks, -(-key.shape[2] // chunk_size))


def check_block_values(blocks: torch.Tensor, n_blocks: int, name: str = "blocks") -> None:
    """Each (row, KV head) of blocks lists distinct block ids in [0, n_blocks), then -1 padding
    (what select_blocks returns). Reads the values: call it only where that is free."""
    if blocks.numel() == 0:
        return
    bad = (blocks < -1) | (blocks >= n_blocks)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise GSAInputError(
            f"{name}{list(where)} = {int(blocks[where])}: block ids must lie in [0, {n_blocks - 1}] "
            f"(the cache holds {n_blocks} blocks) or be -1 (padding)"
        )
    used = blocks >= 0
    gap = used[..., 1:] & ~used[..., :-1]
    if bool(gap.any()):
        where = tuple(int(i) for i in gap.nonzero()[0][:2])
        raise GSAInputError(
            f"{name}{list(where)} has a block id after a -1: each row lists its block ids first, "
            f"then -1 padding"
        )
    ordered = blocks.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(repeated.any()):
        where = tuple(int(i) for i in repeated.nonzero()[0])
        raise GSAInputError(
            f"{name}{list(where[:2])} lists block {int(ordered[where])} more than once: each block "
            f"id may appear once per row (a block is attended once)"
        )


def check_key_codes(key_codes, key: torch.Tensor, weight: torch.Tensor) -> None:
    expected = (key.shape[0], key.shape[1], key.shape[2], weight.shape[2] // 8)
    _require(
        isinstance(key_codes, torch.Tensor) and key_codes.dtype == torch.uint8 and tuple(key_codes.shape) == expected,
        lambda: f"key_codes must be uint8 {expected} (one code per cached key), got "
        f"{getattr(key_codes, 'dtype', None)} {tuple(getattr(key_codes, 'shape', ()))}",
    )
