"""Unwrap GQA/MQA head repetition so a GSA site reads the un-repeated K/V.

Recognised (query head i reads KV head i // G, the convention GSA selects with):
- repeat_kv: x[:, :, None] (or unsqueeze(2)) -> expand(B, Hkv, G, L, D) -> reshape(B, Hkv*G, L, D),
  with an optional contiguous/clone before the reshape;
- repeat_interleave(x, G, dim=1).
Anything else (e.g. x.repeat(1, G, 1, 1), which tiles heads in the other order) is kept as the
keys the site reads: still exact, only not free of the repeat."""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..fx_utils import arg, is_op, normalize_dim, shape


def unwrap_repeat(node: fx.Node) -> tuple[fx.Node, int, str]:
    """(source, groups, how): the un-repeated tensor and the repeat factor, or (node, 1, "")."""
    for unwrap in (_repeat_kv, _repeat_interleave):
        found = unwrap(node)
        if found is not None:
            return found
    return node, 1, ""


def _repeat_kv(node: fx.Node) -> Optional[tuple[fx.Node, int, str]]:
    if not is_op(node, "reshape"):
        return None
    expanded = node.args[0]
    while is_op(expanded, "contiguous"):
        expanded = expanded.args[0]
    if not is_op(expanded, "expand"):
        return None
    inserted = expanded.args[0]
    source = _source_of_inserted_axis(inserted)
    src_shape, exp_shape, out_shape = shape(source), shape(expanded), shape(node)
    if source is None or src_shape is None or exp_shape is None or out_shape is None:
        return None
    if len(src_shape) != 4 or len(exp_shape) != 5 or len(out_shape) != 4:
        return None
    kv_heads, groups = exp_shape[1], exp_shape[2]
    if not (isinstance(kv_heads, int) and isinstance(groups, int) and src_shape[1] == kv_heads):
        return None
    if out_shape[1] != kv_heads * groups:
        return None
    return source, groups, "repeat_kv"


def _source_of_inserted_axis(node) -> Optional[fx.Node]:
    """x when `node` is x with a new size-1 axis at dim 2 (unsqueeze(2) or x[:, :, None])."""
    if is_op(node, "unsqueeze"):
        source = node.args[0]
        src_shape = shape(source)
        dim = arg(node, 1, "dim")
        if src_shape is not None and isinstance(dim, int) and normalize_dim(dim, len(src_shape) + 1) == 2:
            return source
        return None
    if is_op(node, "getitem") and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if len(index) >= 3 and index[0] == full and index[1] == full and index[2] is None and all(
            i == full or i is Ellipsis for i in index[3:]
        ):
            return node.args[0]
    return None


def _repeat_interleave(node: fx.Node) -> Optional[tuple[fx.Node, int, str]]:
    if not is_op(node, "repeat_interleave"):
        return None
    source = node.args[0]
    repeats = arg(node, 1, "repeats")
    dim = arg(node, 2, "dim")
    src_shape = shape(source)
    if not isinstance(repeats, int) or not isinstance(dim, int) or src_shape is None or len(src_shape) != 4:
        return None
    if normalize_dim(dim, 4) != 1:
        return None
    return source, repeats, "repeat_interleave"
