"""Block selectors compared by the accuracy benchmark.

Every selector answers one question the same way: given a decode query [B, Hq, 1, D], the
layer's keys [B, Hkv, L, D], the chunk size, the must-select blocks and a budget of k blocks,
which blocks (int32 [B, Hkv, k], ascending, -1 padded) does each (row, KV head) attend? The
must-select blocks and the tie rule come from the reference kernel's `top_blocks`, so two
selectors differ only in how they score blocks.

- gsa: the product's own gsa::select_blocks on hash codes (random or trained weights); the
  codes of the prefilled keys are encoded once per prefill, decode keys as they arrive.
- exact: the true q.k, block score = max over the block of the sum over the group of q.k
  (what any code-based selector with "max" blocks approximates: its ceiling).
- quest: Quest's bound, per block key min/max, score = sum over dims of max(q*kmin, q*kmax),
  summed over the group.
- window: the must-select blocks and the most recent blocks (a sink + recent window).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import functional
from ..kernels.common import ceil_div
from ..kernels.reference import block_scores, top_blocks


class Selector:
    name = "selector"

    def on_prefill(self, layer: int, key: torch.Tensor) -> None:
        """Sees the keys a dense prefill put in the cache (once per prefill)."""

    def select(self, layer: int, query, key, chunk_size: int, num_blocks: int, must_select: Sequence[int]) -> torch.Tensor:
        scores = self.block_scores(layer, query, key, chunk_size)
        return top_blocks(scores, must_select, num_blocks)

    def block_scores(self, layer: int, query, key, chunk_size: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} scores blocks in select()")


def _group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, 1, D] -> [B, Hkv, G, D] float32."""
    batch, heads, _, dim = query.shape
    return query.float().reshape(batch, kv_heads, heads // kv_heads, dim)


class GSASelector(Selector):
    """gsa::select_blocks with per-layer hash weights (dict layer -> [Hkv, D, R])."""

    def __init__(self, name: str, weights: dict):
        self.name = name
        self.weights = weights
        self._prefill_codes: dict[int, torch.Tensor] = {}

    def on_prefill(self, layer, key):
        self._prefill_codes[layer] = functional.encode(key, self.weights[layer])

    def select(self, layer, query, key, chunk_size, num_blocks, must_select):
        codes = self._codes(layer, key)
        return functional.select_blocks(
            query, codes, self.weights[layer], chunk_size=chunk_size, num_blocks=num_blocks,
            must_select=must_select, repre="max",
        )

    def _codes(self, layer, key) -> torch.Tensor:
        prefix = self._prefill_codes.get(layer)
        if prefix is None or prefix.shape[2] > key.shape[2] or prefix.shape[0] != key.shape[0]:
            return functional.encode(key, self.weights[layer])
        # Decode keys differ between rules replayed on one prefill, so only the prefill's codes are kept.
        tail = functional.encode(key[:, :, prefix.shape[2]:], self.weights[layer])
        return torch.cat([prefix, tail], dim=2)


class ExactSelector(Selector):
    name = "exact"

    def block_scores(self, layer, query, key, chunk_size):
        similarity = torch.einsum("bhgd,bhld->bhl", _group_queries(query, key.shape[1]), key.float())
        return block_scores(similarity, None, chunk_size, "max")


class QuestSelector(Selector):
    name = "quest"

    def block_scores(self, layer, query, key, chunk_size):
        batch, kv_heads, length, dim = key.shape
        n_blocks = ceil_div(length, chunk_size)
        # Repeating the last key into the padding leaves every block's min and max unchanged.
        padded = F.pad(key.float(), (0, 0, 0, n_blocks * chunk_size - length), mode="replicate")
        blocks = padded.reshape(batch, kv_heads, n_blocks, chunk_size, dim)
        kmin, kmax = blocks.amin(3), blocks.amax(3)
        grouped = _group_queries(query, kv_heads).unsqueeze(3)  # [B, Hkv, G, 1, D]
        bound = torch.maximum(grouped * kmin.unsqueeze(2), grouped * kmax.unsqueeze(2))
        return bound.sum(-1).sum(2)


class WindowSelector(Selector):
    name = "window"

    def block_scores(self, layer, query, key, chunk_size):
        n_blocks = ceil_div(key.shape[2], chunk_size)
        recency = torch.arange(n_blocks, dtype=torch.float32, device=key.device)
        return recency.expand(key.shape[0], key.shape[1], n_blocks)


def build_selectors(rules: Sequence[str], random_weights: dict, trained_weights: Optional[dict]) -> dict[str, Selector]:
    """rule name -> selector for every rule except "dense" (which selects nothing)."""
    available = {
        "gsa_random": lambda: GSASelector("gsa_random", random_weights),
        "gsa_trained": lambda: GSASelector("gsa_trained", trained_weights),
        "exact": ExactSelector,
        "quest": QuestSelector,
        "window": WindowSelector,
    }
    selectors = {}
    for rule in rules:
        if rule == "dense":
            continue
        if rule not in available:
            raise ValueError(f"unknown selection rule {rule!r}; allowed: {['dense', *available]}")
        if rule == "gsa_trained" and trained_weights is None:
            raise ValueError("rule 'gsa_trained' needs trained hash weights (gsa-compile calibrate writes them)")
        selectors[rule] = available[rule]()
    return selectors
