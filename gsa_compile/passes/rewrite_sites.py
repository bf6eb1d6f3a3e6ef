"""Pass: replace every sparse and reuse site by one GSA call (site_runtime.gsa_site).

The call reads the matched q/k/v/mask, the layer's hash weight and codes (insert_codes_state),
and for reuse layers the blocks output of the source layer; its first output takes over the
users of the site's output. The replaced subgraph is then removed when nothing else reads it."""

from __future__ import annotations

import operator

from torch import fx

from .context import PassContext
from .fx_utils import is_metadata_assert, op_name, real_users, value
from .site_runtime import gsa_mha_site, gsa_site

# Ops the pass may delete once unused (pure: no in-place or other side effects).
_REMOVABLE = {
    "sdpa", "sdpa_flash", "sdpa_flash_cpu", "sdpa_efficient", "sdpa_cudnn", "mha_forward", "matmul", "bmm", "einsum",
    "softmax", "mul", "div", "add", "tanh", "masked_fill", "where", "logical_not", "cast", "dropout", "transpose",
    "permute", "unsqueeze", "expand", "reshape", "repeat_interleave", "contiguous", "getitem", "baddbmm", "full",
    "scalar_tensor", "maximum", "amax", "sub", "detach", "compare",
}


def _site_options(context: PassContext, match) -> dict:
    layer = match.layer
    options = context.config.attention_kwargs(layer, _device_type(context, match))
    options.update(
        key_norm_weighting=context.config.key_norm_weighting,
        invert_mask=match.invert_mask,
        is_causal=match.is_causal,
        scale=match.scale,
        softcap=match.softcap,
    )
    if match.projection is None:
        options.update(
            query_permute=match.query_permute, key_permute=match.key_permute, value_permute=match.value_permute,
            output_permute=match.output_permute, key_transposed=match.key_transposed,
            finite_fill=match.finite_fill,
        )
    return options


def _device_type(context: PassContext, match) -> str:
    example = value(match.query)
    return example.device.type


def rewrite_sites(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    if not context.rewrite:
        return gm
    by_layer = {match.layer: match for match in context.matches}
    blocks_of = {}
    for layer in context.rewrite_order:
        match = by_layer[layer]
        codes, norms, _ = context.codes[layer]
        reuse = blocks_of.get(context.reuse_sources.get(layer)) if context.policies[layer] == "reuse" else None
        weight = context.weights[layer]
        scale_node, scale_op = match.scale_input or (None, "mul")
        with gm.graph.inserting_before(match.output):
            if match.projection is None:
                call = gm.graph.call_function(
                    gsa_site,
                    (match.query, match.key, match.value, match.attn_mask, weight, codes, norms, reuse, scale_node,
                     scale_op == "div"),
                    _site_options(context, match),
                )
            else:
                p = match.projection
                call = gm.graph.call_function(
                    gsa_mha_site,
                    (match.query, match.key, match.value, match.attn_mask, weight, p["in_proj_weight"],
                     p["in_proj_bias"], p["out_proj_weight"], p["out_proj_bias"], p["q_proj_weight"],
                     p["k_proj_weight"], p["v_proj_weight"], p["key_padding_mask"]),
                    {"num_heads": p["num_heads"], **_site_options(context, match)},
                )
            out = gm.graph.call_function(operator.getitem, (call, 0))
            blocks_of[layer] = gm.graph.call_function(operator.getitem, (call, 1))
        for key in ("val", "example_value"):
            if key in match.output.meta:
                out.meta[key] = match.output.meta[key]
        match.output.replace_all_uses_with(out)
    _remove_unused(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def _remove_unused(graph: fx.Graph) -> None:
    """Delete pure ops nothing reads any more (with the metadata asserts on them)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_function", "call_method") and op_name(node) in _REMOVABLE and not real_users(node):
                for assertion in [user for user in node.users if is_metadata_assert(user)]:
                    graph.erase_node(assertion)
                graph.erase_node(node)
                changed = True
