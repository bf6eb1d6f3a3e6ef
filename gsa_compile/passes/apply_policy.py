"""Pass: the per-layer policy of the config: dense layers keep their attention, sparse layers
compute their own selection, reuse layers read another layer's selection.

Reuse is a graph edge from the source layer's blocks output, so the source must be a sparse
site of this graph that computes before the reusing one; networkx orders the reuse chains so
sources are rewritten first. A reuse whose source is not in this graph (split by a graph
break) computes its own selection, and the report says so."""

from __future__ import annotations

import networkx as nx
from torch import fx

from .context import PassContext


def apply_policy(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    config = context.config
    by_layer = {match.layer: match for match in context.matches}
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    reuse = nx.DiGraph()
    reuse.add_nodes_from(by_layer)
    for layer, match in by_layer.items():
        policy = config.layer_policy(layer)
        context.policies[layer] = policy
        if policy != "reuse":
            continue
        source = config.selection_source(layer)
        source_match = by_layer.get(source)
        if match.projection is not None:
            context.policies[layer] = "sparse"
            context.notes[layer] = f"MultiheadAttention site computes its own selection (reuse of layer {source} not wired)"
            continue
        if source_match is None or order[source_match.output] > order[match.output]:
            context.policies[layer] = "sparse"
            context.notes[layer] = f"reuse source layer {source} is not computed before it in this graph; own selection"
            continue
        reuse.add_edge(source, layer)
    context.reuse_sources = {layer: source for source, layer in reuse.edges}
    context.rewrite_order = [layer for layer in nx.topological_sort(reuse) if context.policies[layer] != "dense"]
    return gm
