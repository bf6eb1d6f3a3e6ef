"""The decode runtime every route shares: per step, once, the mask's valid/bias form, the
dense-or-sparse decision and the number of blocks each row selects.

A decode step of a model runs many GSA layers over the same cache length and the same mask.
`plan_decode` turns that mask into what the kernels take (valid [B, L] bool, an additive bias
only where the mask carries one) and decides dense or sparse by the rules of the config's
thresholds:

- more than one query token (prefill, chunked prefill), fewer keys than seq_len_threshold,
  or fewer batch rows than concurrency_threshold: dense, decided on the host from shapes;
- otherwise, with a mask: the cache's filled length (1 + the last valid key of any row) below
  seq_len_threshold, or fewer than concurrency_threshold rows with seq_len_threshold valid keys:
  dense. These depend on the mask's values. On CPU tensors the host reads them; on an
  accelerator they stay on the device and are folded into the number of blocks each row
  selects (every filled block when dense), so a decode step never waits for the device and
  replays unchanged inside a CUDA graph.

The HF route makes one plan per forward pass (`DecodeStep`); gsa::attention makes one per
call (the FX route, where every site sees its own mask node)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels import common

# Why a call runs dense. Keys are stable (counters and tests use them); values say why.
DENSE_REASONS = {
    "dense_layer": "dense layer (top_k_ratio >= 1 or kept dense by the model's constraints)",
    "prefill": "more than one query token (prefill or chunked prefill): dense, codes only written",
    "causal_single_query": "is_causal with one query token attends key 0 only under SDPA's top-left rule",
    "short": "fewer keys than seq_len_threshold",
    "concurrency": "fewer than concurrency_threshold rows reach seq_len_threshold",
    "dropout": "training with attention dropout",
    "attention_weights": "attention weights requested",
    "unsupported_kwarg": "an attention argument the sparse path does not implement (see the log)",
    "mask_type": "a mask that is not a tensor (the sparse path takes tensor masks)",
    "no_codes": "no codes: the cache is not one GSA can extend (see the log) or no cache was passed",
    "kv_heads_repeated": "keys reach attention with more heads than the cache encoded, in an order not proven here",
    "no_step": "the model did not pass GSA's per-call state down to its attention (see the log)",
    "reuse_source_dense": "the layer whose selection this layer reuses ran dense in this step",
}


def is_host_readable(t: Tensor) -> bool:
    """Reading this tensor's values costs no device synchronisation and breaks no graph
    being compiled (CPU tensors outside torch.compile tracing)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


@dataclasses.dataclass
class DecodePlan:
    """What the layers of one decode step share. `dense` is the host's decision: a reason key
    (dense), None (sparse), or "device" when the decision is `dense_on_device`'s value."""

    num_keys: int
    chunk_size: int
    valid: Optional[Tensor] = None  # [B, L] bool
    bias: Optional[Tensor] = None  # broadcastable to [B, Hq, 1, L], additive
    dense: Optional[str] = None
    dense_on_device: Optional[Tensor] = None  # bool [] on the device: every filled block
    short_on_device: Optional[Tensor] = None  # bool []: the "short" part of dense_on_device
    row_length: Optional[Tensor] = None  # int64 [B]: 1 + last valid key index (0 without one)
    _limits: dict = dataclasses.field(default_factory=dict)  # per budget: blocks, device-side limits

    @property
    def n_blocks(self) -> int:
        return common.ceil_div(self.num_keys, self.chunk_size)

    @property
    def host_sparse(self) -> bool:
        return self.dense is None

    def num_blocks(self, top_k_ratio: Optional[float], budget_tokens: Optional[int], must_select: Sequence[int]) -> int:
        """Width of the selection: k when the host knows every row's length, else every block
        (rows then stop at their device-side limit)."""
        if self.dense is not None:
            return self.n_blocks
        key = ("num_blocks", top_k_ratio, budget_tokens, tuple(must_select))
        if key not in self._limits:  # once per step and budget, not once per layer
            self._limits[key] = common.num_selected_blocks(
                self.num_keys, self.chunk_size, top_k_ratio=top_k_ratio, budget_tokens=budget_tokens,
                must_select=must_select,
            )
        return self._limits[key]

    def limit(self, top_k_ratio: Optional[float], budget_tokens: Optional[int],
              must_select: Sequence[int]) -> Optional[Tensor]:
        """int32 [B]: blocks each row selects, decided on the device (None when the host knows
        k for every row). Rows of a dense step take every filled block."""
        if self.dense != "device":
            return None
        key = (top_k_ratio, budget_tokens, tuple(must_select))
        if key not in self._limits:
            k = row_budget(self.row_length, self.chunk_size, top_k_ratio, budget_tokens, must_select)
            every = common.ceil_div(self.row_length, self.chunk_size)
            self._limits[key] = torch.where(self.dense_on_device, every, k).to(torch.int32)
        return self._limits[key]

    def device_counts(self) -> Tensor:
        """int64 [3] of a plan decided on the device: (sparse, dense as short, dense as
        concurrency), one of them 1, for counters every layer of the step adds."""
        dense, short = self.dense_on_device, self.short_on_device
        return torch.stack([~dense, short, dense & ~short]).to(torch.int64)


def plan_decode(
    query: Tensor, num_keys: int, attn_mask: Optional[Tensor], is_causal: bool, chunk_size: int,
    seq_len_threshold: int, concurrency_threshold: int,
) -> DecodePlan:
    """The plan of a call with `query` [B, Hq, T, D] over `num_keys` cached keys (module docstring)."""
    plan = DecodePlan(num_keys=num_keys, chunk_size=chunk_size)
    batch, heads, tokens = query.shape[0], query.shape[1], query.shape[2]
    if tokens > 1:
        plan.dense = "prefill"
        return plan
    if is_causal and num_keys > 1:
        plan.dense = "causal_single_query"
        return plan
    if num_keys < seq_len_threshold:
        plan.dense = "short"
        return plan
    if batch < concurrency_threshold:
        plan.dense = "concurrency"
        return plan
    plan.valid, plan.bias = common.split_decode_mask(attn_mask, batch, heads, num_keys)
    if plan.valid is None:
        return plan  # every row holds all num_keys >= seq_len_threshold keys
    positions = torch.arange(1, num_keys + 1, device=plan.valid.device)
    plan.row_length = (plan.valid * positions).amax(-1)
    long_rows = (plan.valid.sum(-1) >= seq_len_threshold).sum()
    short = plan.row_length.amax() < seq_len_threshold
    dense = short | (long_rows < concurrency_threshold)
    if is_host_readable(dense):
        plan.dense = ("short" if bool(short) else "concurrency") if bool(dense) else None
    else:
        plan.dense, plan.dense_on_device, plan.short_on_device = "device", dense, short
    return plan


def row_budget(row_length: Tensor, chunk_size: int, top_k_ratio: Optional[float], budget_tokens: Optional[int],
               must_select: Sequence[int]) -> Tensor:
    """common.num_selected_blocks for every row at once, on the device: k from the row's own
    block count, clamped to [its must-select blocks, its block count]."""
    blocks = common.ceil_div(row_length, chunk_size)
    if budget_tokens is not None:
        k = torch.full_like(blocks, common.ceil_div(budget_tokens, chunk_size))
    else:
        # Same rounding as num_selected_blocks: 0.3 * 10 is 3 blocks, not 4.
        k = torch.ceil(torch.round(blocks.to(torch.float64) * top_k_ratio, decimals=9)).clamp(min=1).to(blocks.dtype)
    return torch.minimum(torch.maximum(k, must_select_count(blocks, must_select)), blocks)


def must_select_count(blocks: Tensor, must_select: Sequence[int]) -> Tensor:
    """Per row, how many distinct must-select indices fall inside [0, blocks)."""
    if not must_select:
        return torch.zeros_like(blocks)
    entries = torch.tensor(list(must_select), device=blocks.device, dtype=blocks.dtype)
    index = torch.where(entries >= 0, entries, blocks[:, None] + entries)  # [B, M]
    inside = (index >= 0) & (index < blocks[:, None])
    earlier = torch.ones(len(must_select), len(must_select), dtype=torch.bool, device=blocks.device).tril(-1)
    repeated = ((index[:, :, None] == index[:, None, :]) & inside[:, None, :] & earlier).any(-1)
    return (inside & ~repeated).sum(-1)


def every_filled_block(plan: DecodePlan, batch: int, kv_heads: int, device: torch.device) -> Tensor:
    """int32 [B, Hkv, n_blocks]: every block up to each row's last valid key, then -1: the
    selection of a dense decode through the sparse kernel."""
    index = torch.arange(plan.n_blocks, dtype=torch.int32, device=device)
    if plan.row_length is not None:
        filled = common.ceil_div(plan.row_length, plan.chunk_size)
        index = torch.where(index < filled[:, None], index, -1)
    return index.expand(batch, kv_heads, -1) if index.dim() == 1 else index[:, None, :].expand(-1, kv_heads, -1)


def truncate(blocks: Tensor, num_blocks: int, limit: Optional[Tensor]) -> Tensor:
    """A reused selection cut to this layer's budget: the first num_blocks entries, or the
    first limit[b] entries of row b (later entries become -1)."""
    if limit is None:
        return blocks[..., :num_blocks]
    width = torch.arange(blocks.shape[-1], device=blocks.device)
    return torch.where(width < limit[:, None, None], blocks, -1)
