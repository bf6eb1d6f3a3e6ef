"""Pass: give each site its layer id.

From the module path when every site sits in its own numbered module (`model.layers.3.self_attn`
-> 3, the model's own layer index, stable across graph breaks and recompiles); otherwise by
graph order (0, 1, ... in the order the sites compute).

When dynamo compiles a submodule's forward as its own frame (after a graph break inside a loop
over layers), module paths start at that submodule and carry no index, and the one compiled
graph then serves every layer of that class: no layer id can be baked into it. When the caller
knows the model's parameter names (context.parameter_names, given by optimize and inspect) and
the site's weights live below a numbered module of the model, such sites are left dense and
reported, instead of all being given one layer's id."""

from __future__ import annotations

import re

from torch import fx

from ..report import Unmatched
from .context import PassContext
from .fx_utils import module_path, upstream_tensors

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index_of(module_path: str):
    """The last numeric component of a module path (`h.11.attn` -> 11), or None."""
    found = _INDEX.findall(module_path)
    return int(found[-1]) if found else None


def _refuse_per_layer_frames(context: PassContext) -> None:
    kept = []
    for match in context.matches:
        inside = layer_index_of(_path_from_parameters(match, context.parameter_names))
        if layer_index_of(match.module_path) is None and inside is not None:
            context.report.unmatched.append(Unmatched(
                location=f"layer {inside}:{match.output.name}",
                reason="captured in a frame of one layer's module (a graph break inside the loop over layers?); "
                       "dynamo reuses that graph for every layer, so no layer id can be given to it. Compile "
                       "with fullgraph=True or move the graph break out of the layer loop"))
        else:
            kept.append(match)
    context.matches = kept


def _path_from_parameters(match, names: dict) -> str:
    """Qualified name of the parameter nearest upstream of the site's query, or ''."""
    return next((names[id(tensor)] for _, tensor in upstream_tensors(match.query) if id(tensor) in names), "")


def _captured_below_numbered_modules(gm: fx.GraphModule) -> bool:
    """No node records a numbered module path: the frame is one module below the model's
    numbered ones (in a frame of the model, the calls into its layers carry their index, even
    when the attention itself is written in the parent over the layers' weights)."""
    return all(layer_index_of(module_path(node)) is None for node in gm.graph.nodes)


def number_layers(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    if context.parameter_names and _captured_below_numbered_modules(gm):
        _refuse_per_layer_frames(context)
    ids = [layer_index_of(match.module_path) for match in context.matches]
    if context.matches and None not in ids and len(set(ids)) == len(ids):
        context.numbering = "module_path"
    else:
        ids = list(range(len(context.matches)))
        context.numbering = "graph_order"
    for match, layer in zip(context.matches, ids):
        match.layer = layer
    return gm
