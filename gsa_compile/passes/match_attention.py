"""Pass: find every attention site (matchers/) and list the candidates left dense.

In-place updates of a tensor an op has just made (`scores += bias`, `scores.masked_fill_(m, v)`
on the output of a product, as T5 and XLM write them) are first made functional: the update
becomes its out-of-place op and every later reader of the tensor reads its result, which is the
same value (nothing else can alias a tensor that fresh), and the rules see one dataflow chain.

Activation checkpointing (torch.utils.checkpoint) reaches a dynamo graph as a
tag_activation_checkpoint call of a body graph; what it changes is only what backward
recomputes, never a forward value, so bodies that hold attention are inlined first and their
attention is matched like any other."""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from ..report import Unmatched
from .context import PassContext
from .fx_utils import is_op, module_path, value
from .matchers import find_attention

logger = logging.getLogger(__name__)

_CHECKPOINT = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
# Ops that make a checkpointed body worth inlining.
_ATTENTION_OPS = ("softmax", "sdpa", "sdpa_flash", "sdpa_flash_cpu", "sdpa_efficient", "sdpa_cudnn", "mha_forward")


# In-place op -> its functional form, as call_method names and as operator functions.
_IN_PLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill"}
_IN_PLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                       operator.itruediv: operator.truediv}
# Ops whose output is a new tensor (never a view or the input itself).
_FRESH = ("matmul", "bmm", "einsum", "baddbmm", "add", "mul", "div", "masked_fill", "where", "softmax", "tanh")


def match_attention(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    if inline_checkpoints(gm) + functionalize_fresh_updates(gm):
        gm.recompile()
    matches, refused = find_attention(gm.graph)
    context.matches = matches
    for candidate in refused:
        location = f"{module_path(candidate.node) or '<root>'}:{candidate.node.name}"
        context.report.unmatched.append(Unmatched(location=location, reason=candidate.reason))
    return gm


def inline_checkpoints(gm: fx.GraphModule) -> int:
    """Inline every checkpointed body of `gm` that holds attention; the number inlined."""
    if _CHECKPOINT is None:
        return 0
    inlined = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _CHECKPOINT or node.args[0].op != "get_attr":
            continue
        body = getattr(gm, node.args[0].target)
        inlined += inline_checkpoints(body)
        if not any(is_op(inner, *_ATTENTION_OPS) for inner in body.graph.nodes):
            continue
        if any(inner.op == "get_attr" for inner in body.graph.nodes):
            logger.debug("GSA: checkpointed body %s reads attributes of its own; not inlined", node.args[0].target)
            continue
        if not all(user.op == "call_function" and user.target is operator.getitem for user in node.users):
            continue
        placeholders = [inner for inner in body.graph.nodes if inner.op == "placeholder"]
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(body.graph, dict(zip(placeholders, node.args[1:])))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        body_attr = node.args[0]
        gm.graph.erase_node(node)
        if not body_attr.users:
            gm.graph.erase_node(body_attr)
        inlined += 1
    return inlined


def functionalize_fresh_updates(gm: fx.GraphModule) -> int:
    """Make in-place updates of freshly made tensors functional; the number changed."""
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target in _IN_PLACE_METHODS:
            functional = _IN_PLACE_METHODS[node.target]
        elif node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS:
            functional = _IN_PLACE_FUNCTIONS[node.target]
        else:
            continue
        target = node.args[0] if node.args else None
        if not is_op(target, *_FRESH) or not isinstance(value(target), torch.Tensor) \
                or not isinstance(value(node), torch.Tensor) or value(node).shape != value(target).shape:
            continue
        node.target = functional
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
        changed += 1
    return changed
