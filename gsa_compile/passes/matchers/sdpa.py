"""Rule: scaled_dot_product_attention in every spelling.

Pattern: F.scaled_dot_product_attention / torch._C._nn.scaled_dot_product_attention /
aten.scaled_dot_product_attention (single output), and the backend ops
_scaled_dot_product_{flash_attention, flash_attention_for_cpu, efficient_attention,
cudnn_attention} (tuple outputs, of which only the attention output may be used).
Check: no dropout, 4-D (or 3-D, heads folded) inputs, query heads a multiple of KV heads.
Rewrite record: q, k (repeat unwrapped), v, attn_mask, is_causal, scale, enable_gqa."""

from __future__ import annotations

from typing import Optional, Union

from torch import fx

from ..fx_utils import bound_args, is_op, module_path, op_name, real_users, shape
from .record import AttentionMatch, NotProvable
from .repeat_kv import unwrap_repeat

SINGLE_OUTPUT = ("sdpa",)
TUPLE_OUTPUT = ("sdpa_flash", "sdpa_flash_cpu", "sdpa_efficient", "sdpa_cudnn")
# The argument each spelling passes its mask in.
MASK_ARGUMENT = {"sdpa": "attn_mask", "sdpa_flash_cpu": "attn_mask", "sdpa_efficient": "attn_bias",
                 "sdpa_cudnn": "attn_bias"}


def match(node: fx.Node) -> Union[AttentionMatch, NotProvable, None]:
    name = op_name(node)
    if name not in SINGLE_OUTPUT + TUPLE_OUTPUT:
        return None
    args = bound_args(node)
    output = node
    if name in TUPLE_OUTPUT:
        output = _only_first_output(node)
        if output is None:
            return NotProvable(node, f"{name} outputs other than the attention (logsumexp, rng state) are used; "
                                     f"GSA produces only the attention output")
    dropout = args.get("dropout_p", 0.0)
    if not isinstance(dropout, (int, float)) or dropout != 0:
        return NotProvable(node, f"dropout_p={dropout}: attention with dropout is training, GSA serves inference")
    query, key, value = args["query"], args["key"], args["value"]
    q_shape, k_shape, v_shape = shape(query), shape(key), shape(value)
    if q_shape is None or k_shape is None or v_shape is None:
        return NotProvable(node, "the capture recorded no shapes for query/key/value")
    if not len(q_shape) == len(k_shape) == len(v_shape) or len(q_shape) not in (3, 4):
        return NotProvable(node, f"query/key/value ranks {len(q_shape)}/{len(k_shape)}/{len(v_shape)}: GSA takes "
                                 f"BHSD (4-D) or heads folded into the batch (3-D)")
    source, groups, how = (key, 1, "")
    value_source = value
    if len(q_shape) == 4:
        source, groups, how = unwrap_repeat(key)
        value_source, value_groups, _ = unwrap_repeat(value)
        if value_groups != groups:
            source, groups, how, value_source = key, 1, "", value
        kv_heads = shape(source)[1]
        if not isinstance(kv_heads, int) or q_shape[1] % kv_heads:
            return NotProvable(node, f"query heads {q_shape[1]} are not a multiple of KV heads {kv_heads}")
        groups = q_shape[1] // kv_heads
    scale, scale_input = args.get("scale"), None
    if isinstance(scale, fx.Node):
        # softmax(s * q.k) == softmax((s * q).k): a scale the graph computes is folded into q.
        scale_input = (scale.args[0] if scale.op == "call_method" and scale.target == "item" else scale, "mul")
        scale = 1.0
    elif scale is not None and not isinstance(scale, (int, float)):
        return NotProvable(node, f"scale {scale!r} is neither a number nor a graph value")
    mask = args.get(MASK_ARGUMENT.get(name, ""), None)
    return AttentionMatch(
        pattern=name,
        output=output,
        query=query,
        key=source,
        value=value_source,
        attn_mask=mask,
        scale=None if scale is None else float(scale),
        scale_input=scale_input,
        is_causal=bool(args.get("is_causal", False)),
        gqa_groups=groups,
        gqa_unwrapped=how,
        layout="bhsd" if len(q_shape) == 4 else "3d",
        module_path=module_path(node),
        nodes=[node] if output is node else [node, output],
    )


def _only_first_output(node: fx.Node) -> Optional[fx.Node]:
    """The getitem(node, 0) user when no other output of the tuple is read."""
    users = real_users(node)
    if not all(is_op(user, "getitem") for user in users):
        return None
    first = [user for user in users if user.args[1] == 0]
    others_read = any(real_users(user) for user in users if user.args[1] != 0)
    return first[0] if len(first) == 1 and not others_read else None
