"""Attention-mass recall of hash codes: how much of the true attention the blocks they select hold.

Measured on captured layers (calibrate.capture), at the decode-position queries (the last
``decode_queries`` positions of each sequence, as the layer profiler does): for each such
position p the keys 0..p are the cache, every selector picks k blocks of ``chunk_size`` with
the must-select blocks (k from the budget exactly as the accuracy benchmark computes it), and
the recall is the share of the GQA group's softmax mass inside them (calibrate.profile's
block masses), averaged over positions, KV heads and sequences. The selectors are the
accuracy benchmark's (accuracy.selectors): GSA on the codes of each given weight set (random
and trained at equal bits, say) and the exact top-k ceiling.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..kernels.common import num_selected_blocks
from ..tables import format_table
from .capture import LayerCapture
from .profile import block_mass


def mass_recall(
    captures: dict[int, LayerCapture],
    weights: dict[str, dict],
    *,
    chunk_size: int = 16,
    budget: float = 0.0156,
    must_select: Sequence[int] = (0, -1),
    decode_queries: int = 8,
    exact: bool = True,
) -> dict[str, dict[int, float]]:
    """``{name: {layer: recall}}`` for every weight set in ``weights`` (name -> {layer: [Hkv,
    D, R]}) and, with ``exact``, the exact selector ("exact")."""
    from ..accuracy.selectors import ExactSelector, GSASelector

    selectors = {name: GSASelector(name, layer_weights) for name, layer_weights in weights.items()}
    if exact:
        selectors["exact"] = ExactSelector()
    must = list(must_select)
    sums: dict[str, dict[int, list]] = {name: {} for name in selectors}
    for layer, capture in captures.items():
        for sequence in range(len(capture.keys)):
            masses = block_mass(capture, sequence, decode_queries, chunk_size)  # [P, Hkv, n_blocks]
            queries = capture.queries[sequence][:, -decode_queries:]  # [Hq, P, D]
            first = capture.query_start[sequence] + capture.queries[sequence].shape[1] - queries.shape[1]
            for index in range(queries.shape[1]):
                length = first + index + 1
                key = capture.keys[sequence][None, :, :length]
                tokens = math.ceil(round(budget * length, 9))
                k = num_selected_blocks(length, chunk_size, budget_tokens=tokens, must_select=must)
                query = queries[None, :, index : index + 1]
                mass = masses[index]
                for name, selector in selectors.items():
                    blocks = selector.select(layer, query, key, chunk_size, k, must)[0].long()  # [Hkv, k]
                    kept = torch.where(blocks >= 0, mass.gather(-1, blocks.clamp(min=0)), torch.zeros(()))
                    sums[name].setdefault(layer, []).append(kept.sum(-1))
    return {name: {layer: float(torch.cat(values).mean()) for layer, values in by_layer.items()} for name, by_layer in sums.items()}


def recall_table(recall: dict[str, dict[int, float]]) -> str:
    """One row per layer, one column per selector, and the mean over layers."""
    names = list(recall)
    layers = sorted(next(iter(recall.values())))
    rows = [["layer", *names]]
    for layer in layers:
        rows.append([str(layer), *(f"{recall[name][layer]:.3f}" for name in names)])
    rows.append(["mean", *(f"{sum(recall[name].values()) / len(layers):.3f}" for name in names)])
    return format_table(rows)
