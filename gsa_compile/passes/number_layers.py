"""Pass: give each site its layer id.

From the module path when every site sits in its own numbered module (`model.layers.3.self_attn`
-> 3, the model's own layer index, stable across graph breaks and recompiles); otherwise by
graph order (0, 1, ... in the order the sites compute)."""

from __future__ import annotations

import re

from torch import fx

from .context import PassContext

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index_of(module_path: str):
    """The last numeric component of a module path (`h.11.attn` -> 11), or None."""
    found = _INDEX.findall(module_path)
    return int(found[-1]) if found else None


def number_layers(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    ids = [layer_index_of(match.module_path) for match in context.matches]
    if context.matches and None not in ids and len(set(ids)) == len(ids):
        context.numbering = "module_path"
    else:
        ids = list(range(len(context.matches)))
        context.numbering = "graph_order"
    for match, layer in zip(context.matches, ids):
        match.layer = layer
    return gm
