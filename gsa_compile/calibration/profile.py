"""The layer-policy profiler: which layers stay dense and which reuse another's selection.

Measured on the calibration sequences' decode-position queries (the last `decode_queries`
positions of each sequence, which in the accuracy tasks are the question tokens), per KV head
with the GQA group's attention mass summed:

- sparsity: the share of blocks needed to cover `mass` (90%) of the attention mass. The least
  sparse layers (share above `dense_above`, or the `dense_layers` highest shares) become dense.
- overlap: the Jaccard index between two layers' top-k block sets (k = the sparse ratio's
  budget, must-select blocks included). A sparse layer whose overlap with an earlier computing
  sparse layer exceeds `reuse_above` reuses the best such layer's selection.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..config import GSAConfig
from ..errors import GSAConfigError
from ..kernels.common import num_selected_blocks
from ..kernels.reference import top_blocks
from ..tables import format_table
from .capture import LayerCapture


@dataclasses.dataclass
class LayerProfile:
    layer: int
    share_for_mass: float  # mean share of blocks covering `mass` of the attention
    jaccard: dict  # earlier layer -> mean Jaccard of top-k block sets
    policy: str = "sparse"
    reuse_of: Optional[int] = None


@dataclasses.dataclass
class ProfileResult:
    layers: list
    mass: float
    ratio: float
    chunk_size: int

    def table(self) -> str:
        rows = [("layer", f"blocks for {self.mass:.0%} mass", "best overlap (Jaccard)", "policy")]
        for entry in self.layers:
            best = max(entry.jaccard.items(), key=lambda item: item[1], default=None)
            overlap = "-" if best is None else f"{best[1]:.2f} with layer {best[0]}"
            policy = entry.policy if entry.reuse_of is None else f"reuse {entry.reuse_of}"
            rows.append((str(entry.layer), f"{entry.share_for_mass:.1%}", overlap, policy))
        return format_table(rows)

    def to_dict(self) -> dict:
        return {
            "mass": self.mass, "ratio": self.ratio, "chunk_size": self.chunk_size,
            "layers": [dataclasses.asdict(entry) for entry in self.layers],
        }


def block_mass(capture: LayerCapture, sequence: int, decode_queries: int, chunk_size: int) -> torch.Tensor:
    """[P, Hkv, n_blocks]: attention mass per block of the last `decode_queries` positions,
    summed over each KV head's group of query heads and normalised per KV head."""
    queries = capture.queries[sequence][:, -decode_queries:]  # [Hq, P, D]
    keys = capture.keys[sequence]  # [Hkv, L, D]
    length = keys.shape[1]
    positions = capture.query_start[sequence] + capture.queries[sequence].shape[1] - queries.shape[1] + torch.arange(queries.shape[1])
    grouped = queries.reshape(capture.kv_heads, capture.groups, queries.shape[1], -1)
    logits = torch.einsum("hgpd,hld->hgpl", grouped, keys) * capture.scale
    causal = torch.arange(length)[None, :] <= positions[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(1) / capture.groups
    n_blocks = -(-length // chunk_size)
    padded = torch.nn.functional.pad(probs, (0, n_blocks * chunk_size - length))
    return padded.reshape(capture.kv_heads, -1, n_blocks, chunk_size).sum(-1).transpose(0, 1)


def share_for_mass(masses: torch.Tensor, mass: float) -> torch.Tensor:
    """[..., n] block masses -> [...] share of blocks the heaviest-first order needs for `mass`."""
    ordered = masses.sort(dim=-1, descending=True).values.cumsum(-1)
    needed = (ordered < mass - 1e-6).sum(-1) + 1
    return needed.float() / masses.shape[-1]


def selection_sets(masses: torch.Tensor, ratio: float, must_select: Sequence[int]) -> torch.Tensor:
    """[P, Hkv, n] masses -> bool [P, Hkv, n]: the top-k blocks by mass with the must-select ones."""
    n_blocks = masses.shape[-1]
    k = num_selected_blocks(n_blocks, 1, top_k_ratio=ratio, must_select=must_select)
    chosen = top_blocks(masses, must_select, k).long()
    sets = torch.zeros(*masses.shape[:-1], n_blocks + 1, dtype=torch.bool)
    sets.scatter_(-1, torch.where(chosen < 0, n_blocks, chosen), True)
    return sets[..., :n_blocks]


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a & b).sum(-1).float() / (a | b).sum(-1).clamp(min=1).float()


def profile_layers(
    captures: dict[int, LayerCapture],
    config: GSAConfig,
    *,
    ratio: float = 0.3,
    mass: float = 0.9,
    dense_above: Optional[float] = None,
    dense_layers: Optional[int] = None,
    reuse_above: float = 0.8,
    decode_queries: int = 8,
) -> ProfileResult:
    """Per-layer sparsity and overlap, and the policy they imply (see the module docstring).
    `dense_above` defaults to `ratio`: a layer that needs more blocks than the budget gives for
    `mass` of its attention is better left dense."""
    if not 0 < ratio < 1:
        raise GSAConfigError(f"ratio must be in (0, 1) (the budget of sparse layers), got {ratio}")
    if not 0 < mass <= 1:
        raise GSAConfigError(f"mass must be in (0, 1], got {mass}")
    dense_above = ratio if dense_above is None else dense_above
    chunk = config.chunk_size
    profiles, sets = [], {}
    for layer, capture in captures.items():
        masses = [block_mass(capture, s, decode_queries, chunk) for s in range(len(capture.keys))]
        shares = torch.cat([share_for_mass(m, mass).flatten() for m in masses])
        sets[layer] = [selection_sets(m, ratio, config.must_select_blocks) for m in masses]
        overlaps = {
            earlier: float(torch.cat([jaccard(a, b).flatten() for a, b in zip(sets[layer], sets[earlier])]).mean())
            for earlier in sets if earlier < layer
        }
        profiles.append(LayerProfile(layer, float(shares.mean()), overlaps))
    _assign_policies(profiles, dense_above, dense_layers, reuse_above)
    return ProfileResult(profiles, mass, ratio, chunk)


def _assign_policies(profiles, dense_above: float, dense_layers: Optional[int], reuse_above: float) -> None:
    by_share = sorted(profiles, key=lambda entry: entry.share_for_mass, reverse=True)
    dense = by_share[:dense_layers] if dense_layers is not None else [e for e in by_share if e.share_for_mass > dense_above]
    if len(dense) == len(profiles):
        # A config with no sparse layer would not be GSA at all: keep the sparsest layer sparse.
        dense = dense[:-1]
    for entry in dense:
        entry.policy = "dense"
    computing: list[int] = []
    for entry in profiles:
        if entry.policy == "dense":
            continue
        candidates = {layer: value for layer, value in entry.jaccard.items() if layer in computing and value > reuse_above}
        if candidates:
            entry.policy, entry.reuse_of = "reuse", max(candidates, key=candidates.get)
        else:
            computing.append(entry.layer)


def apply_profile(config: GSAConfig, profile: ProfileResult) -> GSAConfig:
    """The config with the profile's per-layer ratios and reuse (validated by GSAConfig)."""
    ratios = [1 if entry.policy == "dense" else profile.ratio for entry in profile.layers]
    reuse = [-1 if entry.reuse_of is None else entry.reuse_of for entry in profile.layers]
    return config.replace(top_k_ratio_per_layer=ratios, top_k_index_reuse=reuse)
