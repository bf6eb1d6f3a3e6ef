"""Reading and writing vLLM's paged memory for GSA: codes pages, and the keys and values of
the selected blocks, addressed through the request's block table.

A token at position p of a request lives in page block_table[p // page_size] at offset
p % page_size, in every per-token cache of the request's KV cache group: keys, values and the
codes pages, which vLLM allocates with the same block table. Everything here is plain tensor
indexing, so it runs on whatever device the caches live on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops
from ..kernels.common import block_token_index


@dataclass(frozen=True)
class KVLayout:
    """How one attention backend lays K and V out in a layer's cache tensor: `keys(cache)` and
    `values(cache)` return views [pages, kv_heads, page_size, head_dim] (no copy)."""

    name: str
    keys: Callable[[torch.Tensor], torch.Tensor]
    values: Callable[[torch.Tensor], torch.Tensor]


def _cpu_vec_halves(cache: torch.Tensor) -> torch.Tensor:
    pages, heads, page_size, double = cache.shape
    return cache.view(pages, heads, 2, page_size * (double // 2))


def _cpu_vec_keys(cache: torch.Tensor) -> torch.Tensor:
    # vLLM's CPU "vec" kernels store a page's keys head-dim major ([head_dim, page_size]) so a
    # dot product reads page_size keys with one vector load per dim.
    pages, heads, page_size, double = cache.shape
    return _cpu_vec_halves(cache)[:, :, 0].view(pages, heads, double // 2, page_size).transpose(-1, -2)


def _cpu_vec_values(cache: torch.Tensor) -> torch.Tensor:
    pages, heads, page_size, double = cache.shape
    return _cpu_vec_halves(cache)[:, :, 1].view(pages, heads, page_size, double // 2)


# vLLM's CPU attention cache [pages, kv_heads, page_size, 2 * head_dim] under the "vec" and
# "vec16" instruction sets (float32 and float16 caches on x86); other sets tile keys their own way.
CPU_VEC_LAYOUT = KVLayout("cpu_vec", _cpu_vec_keys, _cpu_vec_values)


def token_pages(block_table: torch.Tensor, positions: torch.Tensor, page_size: int):
    """block_table [B, M], positions [B, N] (int64) -> (pages [B, N], offsets [B, N]); positions
    past the table are clamped to its last entry (callers mask them)."""
    index = (positions // page_size).clamp(max=block_table.shape[1] - 1)
    return block_table.to(torch.int64).gather(1, index), positions % page_size


def write_codes(codes_cache: torch.Tensor, codes: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """codes [N, kv_heads, W] -> codes_cache [pages, kv_heads, page_size, W] at each token's slot
    (page * page_size + offset); slots < 0 (padding tokens) are skipped."""
    page_size = codes_cache.shape[2]
    slots = slot_mapping[: codes.shape[0]].to(torch.int64)
    keep = slots >= 0
    slots, codes = slots[keep], codes[keep]
    codes_cache[slots // page_size, :, slots % page_size] = codes


def gather_codes(codes_cache: torch.Tensor, block_table: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Codes of the first num_keys positions of each row: [B, kv_heads, num_keys, W]."""
    positions = torch.arange(num_keys, device=block_table.device).expand(block_table.shape[0], -1)
    pages, offsets = token_pages(block_table, positions, codes_cache.shape[2])
    return codes_cache[pages, :, offsets].permute(0, 2, 1, 3).contiguous()


def gather_selected(
    layout: KVLayout, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    blocks: torch.Tensor, chunk_size: int, num_keys: int,
):
    """The keys and values of the selected blocks [B, kv_heads, k] of each (row, KV head):
    (keys, values [B, kv_heads, k * chunk_size, D], in_range bool [B, kv_heads, k * chunk_size]).
    Only the selected tokens are read; slots of -1 blocks and positions at or past a row's
    length are out of range."""
    batch, heads, _ = blocks.shape
    page_size = kv_cache.shape[2]
    tokens, in_range = block_token_index(blocks, chunk_size, num_keys)
    in_range = in_range & (tokens < seq_lens.to(torch.int64)[:, None, None])
    pages, offsets = token_pages(block_table, tokens.reshape(batch, -1), page_size)
    pages, offsets = pages.view(tokens.shape), offsets.view(tokens.shape)
    head_index = torch.arange(heads, device=blocks.device)[None, :, None]
    keys = layout.keys(kv_cache)[pages, head_index, offsets]
    values = layout.values(kv_cache)[pages, head_index, offsets]
    return keys, values, in_range


def attend_selected(
    query: torch.Tensor, layout: KVLayout, kv_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, blocks: torch.Tensor, chunk_size: int, num_keys: int, scale: float,
    softcap: Optional[float],
) -> torch.Tensor:
    """Exact attention of query [B, Hq, 1, D] over the selected blocks [B, kv_heads, k] of the
    paged cache -> [B, Hq, 1, D]: the selected blocks are gathered side by side and attended
    with gsa::sparse_attention, positions past a row's length masked out per KV head."""
    keys, values, in_range = gather_selected(layout, kv_cache, block_table, seq_lens, blocks, chunk_size, num_keys)
    position = torch.arange(blocks.shape[-1], dtype=torch.int32, device=blocks.device).expand_as(blocks)
    local = torch.where(blocks >= 0, position, -1)
    bias = torch.zeros(in_range.shape, dtype=torch.float32, device=blocks.device)
    bias = bias.masked_fill_(~in_range, float("-inf"))
    bias = bias.repeat_interleave(query.shape[1] // blocks.shape[1], dim=1).unsqueeze(2)
    return ops.sparse_attention(query, keys, values, local, None, bias, chunk_size, scale, softcap)


def layout_self_check(
    layout: KVLayout, write: Callable[..., None], kv_heads: int, page_size: int, head_dim: int,
    dtype: torch.dtype,
) -> Optional[str]:
    """Write known keys and values through the backend's own cache writer `write(key, value,
    key_cache, value_cache, slot_mapping)` into a scratch cache and read them back through
    `layout`; returns None when they match, else what differed."""
    generator = torch.Generator().manual_seed(0)
    pages, tokens = 3, page_size + 3
    cache = torch.zeros(pages, kv_heads, page_size, 2 * head_dim, dtype=dtype)
    halves = cache.view(pages, kv_heads, 2 * page_size, head_dim)
    key_cache, value_cache = halves.chunk(2, dim=2)
    key = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype)
    slots = torch.arange(page_size, page_size + tokens, dtype=torch.int64)
    write(key, value, key_cache, value_cache, slots)
    read_keys = layout.keys(cache)[slots // page_size, :, slots % page_size]
    read_values = layout.values(cache)[slots // page_size, :, slots % page_size]
    if not torch.equal(read_keys, key):
        return f"keys written by the backend do not read back through layout {layout.name!r}"
    if not torch.equal(read_values, value):
        return f"values written by the backend do not read back through layout {layout.name!r}"
    return None
