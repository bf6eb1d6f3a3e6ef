"""What a matcher found: one attention site, as a small record the passes rewrite from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import fx


@dataclass
class AttentionMatch:
    """One attention subgraph, proven equivalent to
    `sdpa(query, key, value, attn_mask, is_causal, scale)` (plus an optional tanh softcap)
    on BHSD tensors after the recorded permutations."""

    pattern: str  # the rule that matched, e.g. "sdpa", "matmul_softmax", "einsum_softmax"
    output: fx.Node  # the node whose value the site produces; its users are rewired
    query: fx.Node
    key: fx.Node  # the un-repeated keys (GQA source) when repeat_kv was unwrapped
    value: fx.Node
    attn_mask: Optional[fx.Node] = None  # SDPA semantics: bool keeps True, float is added
    invert_mask: bool = False  # the mask node is a masked_fill condition (True = masked out)
    # The bool mask came from a fill with a finite value: a row whose every key is masked then
    # has equal scores everywhere, and eager softmax gives the mean of V there (not zero).
    finite_fill: bool = False
    # Masks still to be summed into attn_mask by the rule's rewrite: (mask node, the [B, H, T, L]
    # view of folded heads it was applied under or None, kind, fill of a fill mask or None).
    mask_parts: Optional[list] = None
    scale: Optional[float] = None  # None: 1 / sqrt(head dim)
    # A scale computed in the graph (node, "mul" or "div"); the site folds it into q.
    scale_input: Optional[tuple] = None
    is_causal: bool = False
    softcap: Optional[float] = None
    gqa_groups: int = 1  # query heads per KV head
    gqa_unwrapped: str = ""  # how repeated K/V was unwrapped ("repeat_kv", "repeat_interleave")
    layout: str = "bhsd"  # "bhsd", "bshd", "3d" (heads folded into the batch), "sbe" (MultiheadAttention)
    query_permute: Optional[list] = None  # permutation making query BHSD
    key_permute: Optional[list] = None
    value_permute: Optional[list] = None
    output_permute: Optional[list] = None  # permutation from the BHSD result to the site's layout
    key_transposed: bool = False  # key arrives as [..., D, L]
    module_path: str = ""
    nodes: list = field(default_factory=list)  # the subgraph the site replaces (for reports)
    layer: int = -1  # set by the numbering pass
    projection: Optional[dict] = None  # MultiheadAttention: heads and projection weights (nodes)

    @property
    def location(self) -> str:
        return f"{self.module_path or '<root>'}:{self.output.name}"

    def key_geometry(self) -> tuple[int, int]:
        """(KV heads, key dim) of the site's keys in BHSD (heads folded into the batch: 1 head)."""
        from ..fx_utils import shape

        if self.projection is not None:
            heads = self.projection["num_heads"]
            return heads, shape(self.query)[-1] // heads
        dims = shape(self.key)
        if self.key_permute is not None:
            dims = tuple(dims[i] for i in self.key_permute)
        if self.key_transposed:
            dims = (*dims[:-2], dims[-1], dims[-2])
        return (dims[1] if len(dims) == 4 else 1), dims[-1]


@dataclass
class NotProvable:
    """A candidate a rule recognised as attention but cannot prove equivalent to a GSA site."""

    node: fx.Node
    reason: str
