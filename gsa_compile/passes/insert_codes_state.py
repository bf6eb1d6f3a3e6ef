"""Pass: keep each non-dense site's key codes beside the KV cache that feeds its keys.

The pass looks at what produces the site's (un-repeated) keys:
- torch.cat([past, new], dim=2)                  a growing cache -> gsa::cached_codes_cat
- cache.index_copy(2, index, new), an in-place
  cache.index_copy_(2, index, new) before the site, or a slice assignment
  cache[:, :, start:stop] = new before the site    a static cache  -> store_static_codes
and inserts the matching codes update (codes of `new` only) next to the cache update, on the
codes state of the rewritten model (passes/codes_state.py). A static cache's codes buffer is a
buffer of the graph module, shared with the model's other graphs through the state; it needs
the cache's real tensor (a graph input or buffer), else the site encodes at call time. Key norms
get the same treatment when config.key_norm_weighting. Anything else is the no-cache case: the
site encodes its keys at call time (a module handed the whole K each call has nothing to
remember). The hash weight of each site is a buffer of the graph module too."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import fx

from ..hashing import layer_hash_weight
from ..sharding import HeadShard, is_dtensor, row_shard
from .codes_state import store_static_codes
from .context import PassContext
from .fx_utils import arg, is_op, normalize_dim, shape, upstream_tensors, value

SEQUENCE_DIM = 2
STATIC_CODES_PREFIX = "gsa_static_"


def cache_update_of(match, order: dict):
    """("cat", past, new) | ("index_copy", cache, index, new) | ("slice", cache, start, new) |
    None for the site's keys."""
    if match.projection is not None or match.key_permute is not None or match.key_transposed:
        return None
    key = match.key
    if len(shape(key) or ()) != 4:
        return None
    if is_op(key, "cat"):
        tensors = arg(key, 0, "tensors")
        dim = arg(key, 1, "dim", 0)
        if isinstance(tensors, (list, tuple)) and len(tensors) == 2 and isinstance(dim, int) \
                and normalize_dim(dim, 4) == SEQUENCE_DIM:
            return "cat", tensors[0], tensors[1]
        return None
    if is_op(key, "index_copy", "index_copy_"):  # the updated cache (in place: the op returns it)
        return _index_copy(key, key)
    # An in-place update of a cache buffer the site then reads.
    for user in key.users:
        if order[user] > order[match.output]:
            continue
        if is_op(user, "index_copy_"):
            return _index_copy(user, key)
        assigned = _slice_assignment(user)
        if assigned is not None:
            return ("slice", key, *assigned)
    return None


def _slice_assignment(user: fx.Node):
    """(start, new) when `user` writes new into cache[:, :, start:start + len] in place:
    dynamo's setitem(cache, (:, :, start:stop), new) or export's copy_(slice(cache, 2, start, stop), new)."""
    full = slice(None, None, None)
    if is_op(user, "setitem") and isinstance(user.args[1], tuple):
        index = user.args[1]
        if len(index) >= 3 and index[0] == full and index[1] == full and isinstance(index[2], slice) \
                and index[2].step in (None, 1) and all(i == full or i is Ellipsis for i in index[3:]):
            return index[2].start or 0, user.args[2]
    if is_op(user, "slice") and normalize_dim(user.args[1], 4) == SEQUENCE_DIM and arg(user, 4, "step", 1) == 1:
        writes = [w for w in user.users if is_op(w, "copy_") and w.args[0] is user]
        if len(writes) == 1:
            return arg(user, 2, "start", 0) or 0, writes[0].args[1]
    return None


def slice_positions(new: torch.Tensor, start) -> torch.Tensor:
    """The positions a slice assignment of `new` at `start` writes (its index_copy index)."""
    return torch.arange(new.shape[SEQUENCE_DIM], device=new.device) + start


def _index_copy(update: fx.Node, cache: fx.Node):
    dim, index, new = arg(update, 1, "dim"), arg(update, 2, "index"), arg(update, 3, "source")
    if not isinstance(dim, int) or normalize_dim(dim, 4) != SEQUENCE_DIM:
        return None
    return "index_copy", cache, index, new


def static_codes_buffer_name(layer: int, what: str) -> str:
    return f"{STATIC_CODES_PREFIX}{what}_{layer}"


def is_static_codes_buffer(name: str) -> bool:
    """Whether a graph-module buffer name is a static cache's codes (or norms) buffer."""
    return name.rsplit(".", 1)[-1].startswith(tuple(f"{STATIC_CODES_PREFIX}{what}_" for what in ("codes", "norms")))


def attach(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """A get_attr node of `tensor` registered as buffer `name` of gm. A graph dynamo captured
    also gets a source for it, which AOT autograd needs to lift the buffer as a (static) input."""
    if name not in gm._buffers:
        gm.register_buffer(name, tensor)
        if "dynamo_compile_id" in gm.meta and hasattr(gm, "_param_name_to_source"):
            from torch._dynamo.source import ConstantSource

            gm._param_name_to_source[name] = ConstantSource(name)
    return gm.graph.get_attr(name)


def _real_tensor(gm: fx.GraphModule, node: fx.Node, example_inputs) -> Optional[torch.Tensor]:
    """The tensor a placeholder (from the example inputs) or get_attr node holds, if real."""
    found = None
    if node.op == "placeholder" and example_inputs is not None:
        position = list(gm.graph.find_nodes(op="placeholder")).index(node)
        found = example_inputs[position] if position < len(example_inputs) else None
    elif node.op == "get_attr":
        found = functools.reduce(getattr, node.target.split("."), gm)
    if not isinstance(found, torch.Tensor) or torch._subclasses.fake_tensor.is_fake(found):
        return None
    return found


def _cache_base(cache: fx.Node) -> fx.Node:
    """The cache tensor before the graph's index_copy updates of it."""
    while is_op(cache, "index_copy", "index_copy_"):
        cache = cache.args[0]
    return cache


def _hash_weight(context: PassContext, match, heads: int, key_dim: int, device) -> torch.Tensor:
    """The layer's hash weight: the one the model's other graphs hold, or a new one."""
    layer = match.layer
    weight = context.state.hash_weights.get(layer)
    if weight is None or weight.device != device or tuple(weight.shape[:2]) != (heads, key_dim):
        shard = head_shard(context, match, heads)
        weight = layer_hash_weight(context.config, layer, heads, key_dim, shard).to(device)
        context.state.hash_weights[layer] = weight
    return weight


def head_shard(context: PassContext, match, heads: int) -> Optional[HeadShard]:
    """Which of the model's KV heads the site's `heads` are under tensor parallelism: as the
    caller declared (context.tensor_parallel), or from the key projection's DTensor shard (the
    nearest DTensor weight upstream of the keys: torch's ColwiseParallel); None when unsharded."""
    if context.tensor_parallel is not None:
        rank, size = context.tensor_parallel
        return HeadShard.even(rank, size, heads)
    if not any(is_dtensor(tensor) for tensor in context.example_inputs or ()):
        return None
    for _, tensor in upstream_tensors(match.key):
        if not is_dtensor(tensor) or all(placement.is_replicate() for placement in tensor.placements):
            continue
        # The nearest sharded weight: the key projection's when it is split by rows; sharded
        # otherwise (e.g. the previous layer's row-wise output projection), the keys are whole.
        if not all(placement.is_replicate() or placement.is_shard(0) for placement in tensor.placements):
            return None
        what = f"the key projection of layer {match.layer}"
        first, rows, total = row_shard(tensor, what)
        return HeadShard.from_rows(first, rows, total, rows // heads, what)
    return None


def _link_growing(gm: fx.GraphModule, context: PassContext, layer: int, past: fx.Node, key: fx.Node) -> None:
    """Record where a growing cache's past enters and its cat result leaves the graph, when
    both do, so the compiled callable can tell whether a call's past is its last result."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    outputs = torch.utils._pytree.tree_leaves(gm.graph.output_node().args[0])
    if past in placeholders and key in outputs:
        context.growing_links.append((layer, placeholders.index(past), outputs.index(key)))


def insert_codes_state(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    if not context.rewrite:
        return gm
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    by_layer = {match.layer: match for match in context.matches}
    if not context.rewrite_order:
        return gm
    quantities = ("codes", "norms") if context.config.key_norm_weighting else ("codes",)
    state = context.state
    for layer in context.rewrite_order:
        match = by_layer[layer]
        heads, key_dim = match.key_geometry()
        device = value(match.query).device
        weight = _hash_weight(context, match, heads, key_dim, device)
        with gm.graph.inserting_before(match.output):
            context.weights[layer] = attach(gm, f"gsa_hash_weight_{layer}", weight)
        update = None if context.policies[layer] == "reuse" else cache_update_of(match, order)
        if update is None:
            context.codes[layer] = (None, None, "reuse" if context.policies[layer] == "reuse" else "call time")
            continue
        kind, *operands = update
        made = []
        with gm.graph.inserting_before(match.output):
            if kind == "cat":
                _link_growing(gm, context, layer, operands[0], match.key)
                for what in quantities:
                    made.append(gm.graph.call_function(torch.ops.gsa.cached_codes_cat.default,
                                                       (*operands, context.weights[layer], state.id, layer, what)))
            else:
                cache, index, new = operands
                if kind == "slice":
                    index = gm.graph.call_function(slice_positions, (new, index))
                real = _real_tensor(gm, _cache_base(cache), context.example_inputs)
                if real is None:
                    context.codes[layer] = (None, None, f"call time ({kind} of a cache that is neither a graph input "
                                                        f"nor a buffer)")
                    continue
                counter = attach(gm, "gsa_keys_encoded", state.counter(real.device))
                for what in quantities:
                    buffer = attach(gm, static_codes_buffer_name(layer, what),
                                    state.static_buffer(layer, what, real, weight))
                    made.append(gm.graph.call_function(store_static_codes, (
                        buffer, index, new, context.weights[layer], counter if what == "codes" else None, what)))
        context.codes[layer] = (made[0], made[1] if len(made) > 1 else None, kind)
    return gm
