"""Reading FX graphs from both capture levels with one vocabulary.

Dynamo graphs hold torch functions, operator functions and Tensor methods (`call_method`);
torch.export graphs hold aten overloads. Matchers ask `op_name(node)` for a canonical name and
`bound_args(node)` for arguments by schema name, so one rule reads both levels."""

from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# Canonical name -> the spellings dynamo (functions, operators, method names) and export
# (aten packets) use for it.
_SPELLINGS: dict[str, tuple] = {
    "sdpa": (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
             aten.scaled_dot_product_attention),
    "sdpa_flash": (aten._scaled_dot_product_flash_attention,),
    "sdpa_flash_cpu": (aten._scaled_dot_product_flash_attention_for_cpu,),
    "sdpa_efficient": (aten._scaled_dot_product_efficient_attention,),
    "sdpa_cudnn": (aten._scaled_dot_product_cudnn_attention,),
    "mha_forward": (F.multi_head_attention_forward,),
    "matmul": (torch.matmul, operator.matmul, aten.matmul, "matmul", "__matmul__"),
    "bmm": (torch.bmm, aten.bmm, "bmm"),
    "einsum": (torch.einsum, torch.functional.einsum, aten.einsum),
    "softmax": (torch.softmax, F.softmax, aten.softmax, aten._softmax, "softmax", torch._safe_softmax,
                aten._safe_softmax),
    "baddbmm": (torch.baddbmm, aten.baddbmm, "baddbmm"),
    "mul": (torch.mul, operator.mul, aten.mul, "mul", "__mul__"),
    "div": (torch.div, torch.true_divide, operator.truediv, aten.div, "div", "__truediv__", "true_divide"),
    "add": (torch.add, operator.add, aten.add, "add", "__add__"),
    "sub": (torch.sub, torch.subtract, operator.sub, aten.sub, "sub", "__sub__"),
    "tanh": (torch.tanh, aten.tanh, "tanh"),
    "compare": (operator.eq, operator.ne, torch.eq, torch.ne, aten.eq, aten.ne, "eq", "ne", "__eq__", "__ne__"),
    "masked_fill": (torch.masked_fill, aten.masked_fill, "masked_fill"),
    "where": (torch.where, aten.where, "where"),
    "logical_not": (torch.logical_not, operator.invert, aten.logical_not, aten.bitwise_not, "logical_not",
                    "bitwise_not", "__invert__"),
    "cast": (aten._to_copy, aten.to, "to", "float", "half", "bfloat16", "double", "type_as", "type"),
    "dropout": (F.dropout, torch.dropout, aten.dropout, "dropout"),
    "transpose": (torch.transpose, aten.transpose, "transpose"),
    "permute": (torch.permute, aten.permute, "permute"),
    "unsqueeze": (torch.unsqueeze, aten.unsqueeze, "unsqueeze"),
    "expand": (aten.expand, "expand"),
    "reshape": (torch.reshape, aten.reshape, aten.view, aten._unsafe_view, "reshape", "view"),
    "repeat_interleave": (torch.repeat_interleave, aten.repeat_interleave, "repeat_interleave"),
    "contiguous": (torch.clone, aten.clone, aten.contiguous, "contiguous", "clone"),
    "expand_as": ("expand_as",),
    # torch.max(x, other) and the reduction torch.max(x, dim) (a (values, indices) pair) share spellings.
    "maximum": (torch.maximum, torch.max, aten.maximum, aten.max, "maximum", "max"),
    "amax": (torch.amax, aten.amax, "amax"),
    "logsumexp": (torch.logsumexp, aten.logsumexp, "logsumexp"),
    "detach": (torch.detach, aten.detach, "detach"),
    # Constant tensors: torch.full(size, value), torch.tensor(value) and their aten forms.
    "full": (torch.full, aten.full, "new_full"),
    "scalar_tensor": (torch.tensor, torch.scalar_tensor, aten.scalar_tensor),
    "getitem": (operator.getitem,),
    "cat": (torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat),
    "index_copy": (torch.index_copy, aten.index_copy, "index_copy"),
    "index_copy_": (aten.index_copy_, "index_copy_"),
    "setitem": (operator.setitem,),
    "slice": (aten.slice,),
    "copy_": (aten.copy_, "copy_"),
}

_BY_TARGET: dict[Any, str] = {}
for _name, _spellings in _SPELLINGS.items():
    for _spelling in _spellings:
        _BY_TARGET[_spelling] = _name

# Dynamo-level SDPA calls are bound by argument name with the aten schema (same names).
_SDPA_SCHEMA = aten.scaled_dot_product_attention.default._schema


def op_name(node: fx.Node) -> Optional[str]:
    """Canonical name of what a node computes, or None when it is none of the known ops."""
    if node.op == "call_method":
        return _BY_TARGET.get(node.target)
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _BY_TARGET.get(target.overloadpacket)
    try:
        return _BY_TARGET.get(target)
    except TypeError:  # unhashable target
        return None


def is_op(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and op_name(node) in names


def value(node: Any) -> Any:
    """The example value a capture route recorded for a node (fake tensor), or the constant."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta.get("val", meta.get("example_value"))


def shape(node: Any) -> Optional[tuple]:
    val = value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def dtype(node: Any) -> Optional[torch.dtype]:
    val = value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def bound_args(node: fx.Node) -> dict[str, Any]:
    """Arguments by schema name (defaults filled) for aten overloads and SDPA spellings;
    positional index names ("0", "1", ...) plus kwargs for everything else."""
    schema = None
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
    elif op_name(node) == "sdpa":
        schema = _SDPA_SCHEMA
    if schema is None:
        bound = {str(i): arg for i, arg in enumerate(node.args)}
        bound.update(node.kwargs)
        return bound
    bound = {}
    for i, argument in enumerate(schema.arguments):
        if i < len(node.args) and not argument.kwarg_only:
            bound[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call given positionally at `index` (self is index 0 for methods)."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def module_path(node: fx.Node) -> str:
    """The innermost module a node came from (nn_module_stack), '' when none was recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_module_path(path)


# Dynamo roots module paths at a frame variable: "L['self'].model.layers.0", "L['args'][0].h.1".
_FRAME_ROOT = re.compile(r"^[LG]\[[^\]]*\](\[[^\]]*\])*\.?")


def _clean_module_path(path: str) -> str:
    """The attribute path below the root module (export already records it that way)."""
    return _FRAME_ROOT.sub("", path)


def upstream_tensors(start: fx.Node):
    """(placeholder, tensor) of the real tensors (dynamo's examples: parameters, buffers, inputs)
    a dynamo graph's placeholders hold upstream of `start`, nearest first."""
    seen, frontier = set(), [start]
    while frontier:
        following = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            example = getattr(node.meta.get("grapharg"), "example", None) if node.op == "placeholder" else None
            if isinstance(example, torch.Tensor):
                yield node, example
            following.extend(node.all_input_nodes)
        frontier = following


def is_metadata_assert(node: fx.Node) -> bool:
    """torch.export's dtype/device asserts, which read a value but compute nothing."""
    return node.op == "call_function" and node.target is aten._assert_tensor_metadata.default


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of a node other than metadata asserts."""
    return [user for user in node.users if not is_metadata_assert(user)]


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def captured_whole_forward() -> bool:
    """Whether the graph dynamo is handing to a backend right now holds a whole call: it did
    not end at a graph break and is not the resumed rest of a frame that did. False outside
    a dynamo compile (a torch.export graph is whole by construction: callers know that)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # not inside dynamo's tracing of a frame
        return False
    if tx is None:
        return False
    reason = getattr(tx.output, "compile_subgraph_reason", None)
    resumed = tx.f_code.co_name.startswith("torch_dynamo_resume_in_")
    return reason is not None and not reason.graph_break and not resumed
