"""Pieces of the GSA semantics that every backend shares: bit packing, group mapping,
must-select resolution, mask splitting and budget arithmetic."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_BIT_WEIGHTS = {}


def ceil_div(a, b):
    return (a + b - 1) // b


def bit_weights(device: torch.device) -> torch.Tensor:
    """[8] uint8 of 1, 2, 4, ... 128: bit i of a byte is projected dim 8b + i (little-endian)."""
    key = str(device)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8).to(device)
    return _BIT_WEIGHTS[key]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., R] -> uint8 [..., R // 8], little-endian within each byte."""
    shaped = bits.reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8).to(torch.uint8)
    return (shaped * bit_weights(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., R // 8] -> bool [..., R] (inverse of pack_bits)."""
    bits = (codes.unsqueeze(-1) & bit_weights(codes.device)) != 0
    return bits.reshape(*codes.shape[:-1], codes.shape[-1] * 8)


def projection_dtype(x: torch.Tensor) -> torch.dtype:
    """Hash projections run in float32, or float64 when the input already is."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def resolve_must_select(must_select: Sequence[int], num_blocks: int) -> list[int]:
    """Block indices of must_select inside [0, num_blocks), negatives from the end, deduplicated."""
    resolved = []
    for block in must_select:
        index = block if block >= 0 else num_blocks + block
        if 0 <= index < num_blocks and index not in resolved:
            resolved.append(index)
    return resolved


def num_selected_blocks(
    num_keys: int,
    chunk_size: int,
    *,
    top_k_ratio: Optional[float] = None,
    budget_tokens: Optional[int] = None,
    must_select: Sequence[int] = (0, -2, -1),
) -> int:
    """k = ceil(ratio * n_blocks) or ceil(budget_tokens / C), clamped to [#must-select, n_blocks]."""
    from .validation import GSAInputError, check_budget, check_chunk, check_must_select, is_int

    if not (is_int(num_keys) and num_keys >= 0):
        raise GSAInputError(f"num_keys must be an integer >= 0, got {num_keys!r}")

    check_budget(top_k_ratio, budget_tokens)
    check_chunk(chunk_size)
    check_must_select(must_select)
    n_blocks = ceil_div(num_keys, chunk_size)
    if budget_tokens is not None:
        k = ceil_div(budget_tokens, chunk_size)
    else:
        # Round before the ceiling so 0.3 * 10 is 3 blocks, not 4 from 3.0000000000000004.
        k = max(1, math.ceil(round(top_k_ratio * n_blocks, 9)))
    floor = len(resolve_must_select(must_select, n_blocks))
    return max(floor, min(k, n_blocks))


def row_block_counts(valid: Optional[torch.Tensor], num_keys: int, chunk_size: int) -> Optional[torch.Tensor]:
    """int64 [B]: blocks up to each row's last valid key (0 for a row with none), None when
    every key is valid. Negative must-select indices count back from these, so the unused
    tail of a static cache does not move the recent window. Device ops only: no host read."""
    if valid is None:
        return None
    positions = torch.arange(1, num_keys + 1, device=valid.device)
    row_length = torch.where(valid, positions, 0).amax(-1) if num_keys else valid.new_zeros(valid.shape[0], dtype=torch.int64)
    return ceil_div(row_length, chunk_size)


def plane_layout(groups: int) -> tuple[int, int, int]:
    """How the group sum of +-1 query signs S (in [-G, G]) splits into +-1 planes, so that
    sum_i (R - 2 hamming(q_i, k)) = S . k = sum_p w_p (R - 2 hamming(plane_p, k)) with
    1 + log2(G) planes instead of G codes. Returns (direct, planes, offset):

    - an even group takes its first head's code as it is (`direct` = 1, weight 1), leaving an
      odd number n of heads; an odd group has direct = 0 and n = G;
    - the n heads' sum S' is odd with |S'| <= 2**planes - 1 (planes = bit_length(n)), so
      u = (S' + 2**planes - 1) / 2 = c + offset is an integer in [0, 2**planes - 1], where c is
      how many of the n heads have the bit set and offset = (2**planes - 1 - n) / 2; with u's
      bits u_j, S' = sum_j 2**j (2 u_j - 1): plane j (weight 2**j) is bit j of c + offset."""
    direct = 1 - groups % 2
    counted = groups - direct
    planes = counted.bit_length()
    return direct, planes, ((1 << planes) - 1 - counted) // 2


def plane_weights(groups: int) -> list[int]:
    """Weight of each plane of sign_planes, in order (their sum times R is the top score)."""
    direct, planes, _ = plane_layout(groups)
    return [1] * direct + [1 << j for j in range(planes)]


def sign_planes(query_codes: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Packed query codes [B, Hq, R/8] -> packed planes [B, Hkv, P, R/8] of plane_layout."""
    batch, q_heads, code_bytes = query_codes.shape
    groups = q_heads // kv_heads
    direct, planes, offset = plane_layout(groups)
    bits = unpack_codes(query_codes).reshape(batch, kv_heads, groups, 8 * code_bytes)
    counts = bits[:, :, direct:].sum(2, dtype=torch.int32) + offset
    shifts = torch.arange(planes, dtype=torch.int32, device=query_codes.device)[:, None]
    plane_bits = ((counts.unsqueeze(2) >> shifts) & 1).bool()
    return pack_bits(torch.cat([bits[:, :, :direct], plane_bits], dim=2))


def mask_to_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def allowed_from_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """bool mask of keys a mask lets through: True entries of a bool mask; entries of an
    additive mask above half the dtype's minimum (masked entries are -inf or finfo.min)."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2


def split_decode_mask(attn_mask: Optional[torch.Tensor], batch: int, num_heads: int, num_keys: int):
    """A decode mask (broadcastable to [B, Hq, 1, L]) -> (valid [B, L] bool or None,
    bias [B, 1 or Hq, 1, L] float or None). Valid keys are those some head may attend; the
    bias carries additive values and masks that differ between heads."""
    if attn_mask is None:
        return None, None
    mask = mask_to_4d(attn_mask)[..., -1:, :].expand(batch, -1, 1, num_keys)
    allowed = allowed_from_mask(mask)
    valid = allowed.any(dim=1)[:, 0, :]
    if attn_mask.dtype != torch.bool:
        return valid, mask
    if mask.shape[1] == 1:
        return valid, None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return valid, bias.masked_fill(~allowed, float("-inf"))


def block_token_index(blocks: torch.Tensor, chunk_size: int, num_keys: int):
    """Selected blocks [B, H, k] -> (token index [B, H, k * C] clamped into the cache,
    in-range bool [B, H, k * C]). Slots of -1 blocks and tokens past the cache are out of range."""
    offsets = torch.arange(chunk_size, device=blocks.device, dtype=torch.int64)
    tokens = blocks.to(torch.int64).unsqueeze(-1) * chunk_size + offsets
    in_range = (blocks.unsqueeze(-1) >= 0) & (tokens < num_keys)
    tokens = tokens.clamp(0, max(num_keys - 1, 0)).flatten(-2)
    return tokens, in_range.flatten(-2)
