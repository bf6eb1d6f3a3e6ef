"""Checks every GSA op runs before any backend sees its inputs (shapes and dtypes only, so
they also run on fake tensors while tracing). Each error names the argument and what is allowed."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import GSAInputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REPRE_METHODS = ("max", "min", "sum")
SCOPES = ("per_head", "shared")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise GSAInputError(message)


def _float_tensor(name: str, t: torch.Tensor, dims: int) -> None:
    _require(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _require(t.dtype in FLOAT_DTYPES, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    _require(t.dim() == dims, f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


def check_weight(weight: torch.Tensor, head_dim: int, kv_heads: Optional[int] = None) -> None:
    _float_tensor("weight", weight, 3)
    _require(
        weight.shape[1] == head_dim,
        f"weight is [kv_heads, head_dim, hash_bits] = {tuple(weight.shape)} but the vectors it "
        f"hashes have {head_dim} dims",
    )
    _require(weight.shape[2] % 8 == 0 and weight.shape[2] > 0,
             f"weight's hash_bits ({weight.shape[2]}) must be a positive multiple of 8")
    if kv_heads is not None:
        _require(weight.shape[0] == kv_heads,
                 f"weight has {weight.shape[0]} heads but keys have {kv_heads} KV heads")


def check_encode(x: torch.Tensor, weight: torch.Tensor) -> None:
    _float_tensor("x", x, 4)
    check_weight(weight, x.shape[-1])
    _require(
        x.shape[1] % weight.shape[0] == 0,
        f"x has {x.shape[1]} heads, not a multiple of the weight's {weight.shape[0]} KV heads",
    )


def check_query_keys(query: torch.Tensor, kv_heads: int, num_keys: int, what: str) -> None:
    _float_tensor("query", query, 4)
    _require(query.shape[2] == 1, f"{what} takes one query token per row (decode), got T={query.shape[2]}")
    _require(
        kv_heads > 0 and query.shape[1] % kv_heads == 0,
        f"query heads ({query.shape[1]}) must be a multiple of KV heads ({kv_heads})",
    )
    _require(num_keys > 0, f"{what} needs at least one key, got L=0")


def check_valid(valid: Optional[torch.Tensor], batch: int, num_keys: int) -> None:
    if valid is None:
        return
    _require(valid.dtype == torch.bool, f"valid must be a bool tensor, got {valid.dtype}")
    _require(tuple(valid.shape) == (batch, num_keys),
             f"valid must be [B, L] = {(batch, num_keys)}, got {tuple(valid.shape)}")


def check_select(
    query, key_codes, weight, valid, key_norms, chunk_size: int, num_blocks: int,
    must_select: Sequence[int], repre: str, scope: str,
) -> None:
    _require(isinstance(key_codes, torch.Tensor) and key_codes.dtype == torch.uint8 and key_codes.dim() == 4,
             f"key_codes must be uint8 [B, Hkv, L, R/8], got {getattr(key_codes, 'dtype', None)} "
             f"{tuple(getattr(key_codes, 'shape', ()))}")
    batch, kv_heads, num_keys, code_bytes = key_codes.shape
    check_query_keys(query, kv_heads, num_keys, "select_blocks")
    _require(query.shape[0] == batch, f"query batch {query.shape[0]} != key_codes batch {batch}")
    check_weight(weight, query.shape[-1], kv_heads)
    _require(weight.shape[2] == 8 * code_bytes,
             f"key_codes hold {8 * code_bytes} bits per key but the weight makes {weight.shape[2]}")
    check_valid(valid, batch, num_keys)
    if key_norms is not None:
        _require(tuple(key_norms.shape) == (batch, kv_heads, num_keys),
                 f"key_norms must be [B, Hkv, L] = {(batch, kv_heads, num_keys)}, got {tuple(key_norms.shape)}")
    check_chunk(chunk_size)
    _require(repre in REPRE_METHODS, f"repre must be one of {list(REPRE_METHODS)}, got {repre!r}")
    _require(scope in SCOPES, f"scope must be one of {list(SCOPES)}, got {scope!r}")
    _require(num_blocks >= 1, f"num_blocks must be >= 1, got {num_blocks}")
    from .common import ceil_div, resolve_must_select

    must = resolve_must_select(must_select, ceil_div(num_keys, chunk_size))
    _require(
        num_blocks >= len(must),
        f"num_blocks={num_blocks} is smaller than the {len(must)} must-select blocks {must}; "
        f"must-select blocks count inside the budget",
    )


def check_chunk(chunk_size: int) -> None:
    _require(isinstance(chunk_size, int) and chunk_size > 0, f"chunk_size must be a positive integer, got {chunk_size!r}")


def check_attention_inputs(query, key, value) -> None:
    _float_tensor("query", query, 4)
    _float_tensor("key", key, 4)
    _float_tensor("value", value, 4)
    _require(query.dtype == key.dtype == value.dtype,
             f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    _require(query.shape[0] == key.shape[0] == value.shape[0],
             f"batch sizes differ: query {query.shape[0]}, key {key.shape[0]}, value {value.shape[0]}")
    _require(key.shape[1] == value.shape[1] and key.shape[2] == value.shape[2],
             f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree on heads and length")
    _require(query.shape[-1] == key.shape[-1],
             f"query head dim {query.shape[-1]} != key head dim {key.shape[-1]}")
    _require(
        key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0,
        f"query heads ({query.shape[1]}) must be a multiple of KV heads ({key.shape[1]})",
    )


def check_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size: int) -> None:
    check_attention_inputs(query, key, value)
    check_query_keys(query, key.shape[1], key.shape[2], "sparse_attention")
    _require(
        isinstance(blocks, torch.Tensor) and blocks.dtype in (torch.int32, torch.int64) and blocks.dim() == 3
        and tuple(blocks.shape[:2]) == (key.shape[0], key.shape[1]),
        f"blocks must be int32 [B, Hkv, k] = [{key.shape[0]}, {key.shape[1]}, k], got "
        f"{getattr(blocks, 'dtype', None)} {tuple(getattr(blocks, 'shape', ()))}",
    )
    check_valid(valid, key.shape[0], key.shape[2])
    if attn_bias is not None:
        _require(
            attn_bias.dim() == 4 and attn_bias.shape[0] == key.shape[0] and attn_bias.shape[1] in (1, query.shape[1])
            and attn_bias.shape[2] == 1 and attn_bias.shape[3] == key.shape[2],
            f"attn_bias must be [B, 1 or Hq, 1, L], got {tuple(attn_bias.shape)}",
        )
    check_chunk(chunk_size)


def check_key_codes(key_codes, key: torch.Tensor, weight: torch.Tensor) -> None:
    expected = (key.shape[0], key.shape[1], key.shape[2], weight.shape[2] // 8)
    _require(
        isinstance(key_codes, torch.Tensor) and key_codes.dtype == torch.uint8 and tuple(key_codes.shape) == expected,
        f"key_codes must be uint8 {expected} (one code per cached key), got "
        f"{getattr(key_codes, 'dtype', None)} {tuple(getattr(key_codes, 'shape', ()))}",
    )
