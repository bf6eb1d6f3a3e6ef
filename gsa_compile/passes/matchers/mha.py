"""Rule: torch.nn.MultiheadAttention as dynamo records it (one multi_head_attention_forward call).

Pattern: F.multi_head_attention_forward(query, key, value, embed_dim, num_heads, in_proj_weight,
in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, ...).
Check: batched (3-D, sequence first) inputs, the attention weights are not used (need_weights
returns weights that GSA does not compute), no bias_k/bias_v/add_zero_attn/static_k/static_v,
no dropout in training, no is_causal hint.
Rewrite record: the inputs and projection weights; the site runs in-projection, GSA attention
and out-projection (gsa_mha_site). torch.export decomposes MultiheadAttention into linear ops
and SDPA, which the sdpa rule matches instead."""

from __future__ import annotations

from typing import Union

from torch import fx

from ..fx_utils import is_op, module_path, op_name, real_users, shape
from .record import AttentionMatch, NotProvable

# Positional parameters of F.multi_head_attention_forward, in order.
PARAMETERS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
    "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
    "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "static_k", "static_v", "average_attn_weights", "is_causal",
)
DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
            "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None,
            "static_k": None, "static_v": None, "average_attn_weights": True, "is_causal": False}
# Tensor inputs the GSA site reads, in the order gsa_mha_site takes them.
TENSOR_INPUTS = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias", "q_proj_weight",
                 "k_proj_weight", "v_proj_weight", "key_padding_mask")


def match(node: fx.Node) -> Union[AttentionMatch, NotProvable, None]:
    if op_name(node) != "mha_forward":
        return None
    args = dict(DEFAULTS)
    args.update(zip(PARAMETERS, node.args))
    args.update(node.kwargs)
    users = real_users(node)
    if not all(is_op(user, "getitem") and user.args[1] == 0 for user in users) or len(users) != 1:
        return NotProvable(node, "the attention weights of nn.MultiheadAttention are used (need_weights=True "
                                 "and read); GSA does not compute them. Call it with need_weights=False")
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if args[name] is not None:
            return NotProvable(node, f"MultiheadAttention with {name} is not supported")
    if args["add_zero_attn"]:
        return NotProvable(node, "MultiheadAttention with add_zero_attn is not supported")
    if args["training"] and args["dropout_p"]:
        return NotProvable(node, f"dropout_p={args['dropout_p']} in training mode")
    if args["is_causal"]:
        return NotProvable(node, "is_causal hint on MultiheadAttention: the mask it describes is not in the graph")
    if len(shape(args["query"]) or ()) != 3:
        return NotProvable(node, "unbatched (2-D) MultiheadAttention input")
    match = AttentionMatch(
        pattern="multihead_attention",
        output=users[0],
        query=args["query"],
        key=args["key"],
        value=args["value"],
        attn_mask=args["attn_mask"],
        module_path=module_path(node),
        nodes=[node, users[0]],
        layout="sbe",
    )
    match.projection = {"num_heads": args["num_heads"], **{name: args[name] for name in TENSOR_INPUTS}}
    return match
