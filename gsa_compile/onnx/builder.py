"""A small emitter of ONNX nodes for the gsa reference functions: fresh value names, constants,
attribute references and dynamic dims, so the function bodies read like the spec they encode."""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ai.onnx version the function bodies are written against (BitwiseAnd needs 18, string Equal 19).
BODY_OPSET = 20
INT64_MAX = np.iinfo(np.int64).max

_ATTR_VALUE_FIELD = {
    onnx.AttributeProto.INT: "value_int",
    onnx.AttributeProto.INTS: "value_ints",
    onnx.AttributeProto.FLOAT: "value_float",
    onnx.AttributeProto.STRING: "value_string",
    onnx.AttributeProto.TENSOR: "value",
}


class Emitter:
    """Collects nodes of one graph (a function body or an If branch)."""

    def __init__(self, prefix: str, counter: Optional[itertools.count] = None):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._counter = counter if counter is not None else itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}_{hint}_{next(self._counter)}"

    def branch(self) -> "Emitter":
        """An emitter for a subgraph that shares this one's name counter (names stay unique)."""
        return Emitter(self.prefix, self._counter)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def call(self, domain: str, op_type: str, *inputs: str, forwarded: Sequence[tuple[str, int]] = ()) -> str:
        """A node of another domain (a nested function call) whose attributes `forwarded`
        ((name, type) pairs) are references to the calling node's attributes of the same name."""
        out = self.fresh(op_type.lower())
        node = helper.make_node(op_type, list(inputs), [out], domain=domain)
        for name, kind in forwarded:
            node.attribute.append(onnx.AttributeProto(name=name, ref_attr_name=name, type=kind))
        self.nodes.append(node)
        return out

    def const(self, value, dtype) -> str:
        """A Constant node holding `value` (scalar or list) as a numpy array of `dtype`."""
        array = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=numpy_helper.from_array(array, self.fresh("c")))

    def attr(self, name: str, kind: int) -> str:
        """A Constant whose value is the calling node's attribute `name` (a function attribute reference)."""
        field = _ATTR_VALUE_FIELD[kind]
        reference = onnx.AttributeProto(name=field, ref_attr_name=name, type=kind)
        out = self.fresh(name)
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(reference)
        self.nodes.append(node)
        return out

    # ------------------------------------------------------------------ dims and shapes
    def dims(self, x: str, start: int, end: Optional[int] = None) -> str:
        """int64 [end - start]: dims start..end-1 of x (end None: to the last)."""
        attrs = {"start": start} if end is None else {"start": start, "end": end}
        return self.op("Shape", x, **attrs)

    def cat(self, *parts: str) -> str:
        return self.op("Concat", *parts, axis=0)

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def arange(self, count: str) -> str:
        """int64 [count]: 0, 1, ..., count - 1, for a [1]-shaped count."""
        return self.op("Range", self.const(0, np.int64), self.squeeze(count, 0), self.const(1, np.int64))

    def reshape(self, x: str, *parts: str) -> str:
        return self.op("Reshape", x, self.cat(*parts) if len(parts) > 1 else parts[0])

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def where(self, condition: str, a: str, b: str) -> str:
        return self.op("Where", condition, a, b)

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def squeeze(self, x: str, *axes: int) -> str:
        return self.op("Squeeze", x, self.ints(*axes))

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        return self.op(op_type, x, self.ints(*axes), keepdims=keepdims)

    def graph(self, name: str, outputs: Sequence[str]) -> onnx.GraphProto:
        """This emitter's nodes as a subgraph (If branch) returning `outputs`."""
        return helper.make_graph(
            self.nodes, name, [], [helper.make_empty_tensor_value_info(o) for o in outputs]
        )


def make_function(
    name: str, domain: str, inputs: Sequence[str], outputs: Sequence[str], attributes: Sequence[str],
    emitter: Emitter, doc: str, domain_version: int = 1,
) -> onnx.FunctionProto:
    # The function's own domain is imported too: bodies may call other ops of it.
    return helper.make_function(
        domain, name, list(inputs), list(outputs), emitter.nodes,
        opset_imports=[helper.make_opsetid("", BODY_OPSET), helper.make_opsetid(domain, domain_version)],
        attributes=list(attributes), doc_string=doc,
    )


FLOAT = TensorProto.FLOAT
DOUBLE = TensorProto.DOUBLE
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
UINT8 = TensorProto.UINT8
BOOL = TensorProto.BOOL
