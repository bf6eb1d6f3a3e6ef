"""Explicit codes inputs and outputs for graphs of the FX route (docs/compiler.md, "Codes state"; docs/onnx.md).

In PyTorch, gsa::cached_codes_cat(past, new, weight, state, site, what) returns the codes (or
key norms) of cat([past, new]) from codes it keeps in Python state. An ONNX file has no such
state, so the exporter makes it explicit: the op is first written as a private placeholder node
(domain `gsa.export`), then each placeholder becomes

    past_key_codes.{site}  (graph input, [B, Hkv, P, R/8] uint8) --+
    gsa.Encode(new, weight) ---------------------------------------+-> Concat -> present_key_codes.{site}

(`.key_norms` and ReduceL2 for what = "norms"), so only the new keys are encoded and the caller
feeds each step's present codes back as the next step's past, like past key values."""

from __future__ import annotations

import onnx
from onnx import helper
from onnx.defs import OpSchema

from .schemas import DOMAIN

PLACEHOLDER_DOMAIN = "gsa.export"
# One placeholder op per per-key quantity, so each has a fixed output type.
PLACEHOLDERS = {"codes": "CachedCodesCat", "norms": "CachedNormsCat"}
PER_KEY_NAMES = {"codes": "key_codes", "norms": "key_norms"}
_OUTPUT_TYPES = {"codes": "tensor(uint8)", "norms": "tensor(float)"}


def _schema(what: str) -> OpSchema:
    return OpSchema(
        PLACEHOLDERS[what], PLACEHOLDER_DOMAIN, 1,
        f"Export-time placeholder of gsa::cached_codes_cat(what={what!r}); replaced before the model is written.",
        inputs=[OpSchema.FormalParameter("past", "T"), OpSchema.FormalParameter("new", "T"),
                OpSchema.FormalParameter("weight", "tensor(float)")],
        outputs=[OpSchema.FormalParameter("out", _OUTPUT_TYPES[what])],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "")],
        attributes=[OpSchema.Attribute("site", OpSchema.AttrType.INT, "")],
    )


def register_placeholder_schemas() -> None:
    for what, name in PLACEHOLDERS.items():
        if not onnx.defs.has(name, PLACEHOLDER_DOMAIN):
            onnx.defs.register_schema(_schema(what))


def lift_codes_state(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every placeholder by explicit past/present codes (see the module docstring)."""
    graph = model.graph
    types = {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}
    nodes = []
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            nodes.append(node)
            continue
        past, new, weight = node.input
        what = next(kind for kind, name in PLACEHOLDERS.items() if name == node.op_type)
        site = helper.get_attribute_value(node.attribute[0])
        stem = f"{PER_KEY_NAMES[what]}.{site}"
        past_name, present_name = f"past_{stem}", f"present_{stem}"
        fresh = f"{present_name}.new"
        if what == "codes":
            nodes.append(helper.make_node("Encode", [new, weight], [fresh], domain=DOMAIN))
        else:
            as_float = helper.make_node("Cast", [new], [f"{fresh}.float"], to=onnx.TensorProto.FLOAT)
            axes = helper.make_node("Constant", [], [f"{fresh}.axes"], value_ints=[-1])
            nodes += [as_float, axes,
                      helper.make_node("ReduceL2", [f"{fresh}.float", f"{fresh}.axes"], [fresh], keepdims=0)]
        nodes.append(helper.make_node("Concat", [past_name, fresh], [node.output[0]], axis=2))
        nodes.append(helper.make_node("Identity", [node.output[0]], [present_name]))
        out_dims = _dims(types.get(node.output[0]))
        past_dims = _dims(types.get(past))[:3] + out_dims[3:]
        graph.input.append(helper.make_tensor_value_info(past_name, _elem_type(what), past_dims or None))
        graph.output.append(helper.make_tensor_value_info(present_name, _elem_type(what), out_dims or None))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [entry for entry in model.opset_import if entry.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def _elem_type(what: str) -> int:
    return onnx.TensorProto.UINT8 if what == "codes" else onnx.TensorProto.FLOAT


def _dims(type_proto) -> list:
    if type_proto is None or not type_proto.tensor_type.HasField("shape"):
        return []
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in type_proto.tensor_type.shape.dim]
