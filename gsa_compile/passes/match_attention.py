"""Pass: find every attention site (matchers/) and list the candidates left dense.

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
from .fx_utils import is_op, module_path
from .matchers import find_attention

logger = logging.getLogger(__name__)

_CHECKPOINT = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
# Ops that make a checkpointed body worth inlining.
_ATTENTION_OPS = ("softmax", "sdpa", "sdpa_flash", "sdpa_flash_cpu", "sdpa_efficient", "sdpa_cudnn", "mha_forward")


def match_attention(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    if inline_checkpoints(gm):
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
