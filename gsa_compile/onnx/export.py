"""export_onnx: a GSA model as ONNX, every GSA site a gsa-domain node with its reference function."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence

import onnx
import torch

from ..errors import GSAError
from ..passes.insert_codes_state import is_static_codes_buffer
from .codes_io import lift_codes_state
from .functions import build_function
from .schemas import DOMAIN, OP_SPECS, OPSET_VERSION, register_schemas

logger = logging.getLogger(__name__)

# The torch.ops.gsa ops the translation table covers.
EXPORTABLE_OPS = ("encode", "select_blocks", "sparse_attention", "attention", "cached_codes_cat")


def gsa_nodes(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the gsa ops an exported program calls."""
    return [
        node.target.name() for node in program.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "gsa"
    ]


def capture(model, args: tuple, *, config=None, kwargs=None, dynamic_shapes=None) -> torch.export.ExportedProgram:
    """An ExportedProgram whose graph holds gsa ops.

    A program or a module that already calls the gsa ops (the functional API) is exported as
    it is; any other module goes through gsa_compile.export, the FX compiler that rewrites its
    attention sites."""
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        program = torch.export.export(model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes)
        if not gsa_nodes(program):
            program = _rewrite(model, args, config, kwargs, dynamic_shapes)
    ops = gsa_nodes(program)
    if not ops:
        raise GSAError(
            "the model has no GSA site to export: no attention was rewritten (every layer dense, or no "
            "attention pattern matched); see gsa_compile.export's report for why"
        )
    stateful = sorted({op for op in ops if op.split("::")[-1].split(".")[0] not in EXPORTABLE_OPS}
                      | {name for name in program.graph_signature.buffers if is_static_codes_buffer(name)})
    if stateful:
        raise GSAError(
            f"the graph updates key codes of a static cache in place ({', '.join(stateful)}), which the ONNX "
            f"export does not lift to inputs and outputs; give the model a growing cache (torch.cat) or "
            f"codes as explicit inputs (gsa_compile.onnx.DecodeStep for transformers models, or "
            f"functional.encode + torch.cat in your forward). Exportable gsa ops: {list(EXPORTABLE_OPS)}"
        )
    return program


def _rewrite(model, args, config, kwargs, dynamic_shapes) -> torch.export.ExportedProgram:
    try:
        from ..api import export as gsa_export
    except ImportError as exc:
        raise GSAError(
            f"{type(model).__name__} calls no gsa op and the FX compiler (gsa_compile.export) is not "
            f"available here ({exc}); call gsa_compile.functional.gsa_attention in the model or "
            f"pass an ExportedProgram that holds gsa ops"
        ) from exc
    logger.info("rewriting the attention sites of %s with gsa_compile.export", type(model).__name__)
    return gsa_export(model, tuple(args), config=config, kwargs=kwargs, dynamic_shapes=dynamic_shapes)


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the reference function of every gsa op the graph uses (once each) and the domain import."""
    used = set()
    _collect_gsa_ops(model.graph, used)
    known = {(f.domain, f.name) for f in model.functions}
    pending = sorted(used)
    while pending:
        name = pending.pop()
        if name not in OP_SPECS:
            raise GSAError(f"the graph holds gsa.{name}, which is not an op of the gsa domain {sorted(OP_SPECS)}")
        if (DOMAIN, name) in known:
            continue
        function = build_function(OP_SPECS[name])
        model.functions.append(function)
        known.add((DOMAIN, name))
        # A body may call other gsa ops (Attention calls SelectTopBlocks): their functions too.
        called: set = set()
        _collect_gsa_ops(function, called)
        pending += sorted(called)
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    return model


# The IR version torch.onnx writes; newer onnx releases default to IRs older onnxruntimes refuse.
IR_VERSION = 10


def node_model(op: str, example: dict, **attrs) -> onnx.ModelProto:
    """A checked one-node model of gsa.<op> (with its functions) whose inputs have the dtypes
    and ranks of `example` (name -> numpy array) and fully dynamic dims; attribute values are
    python values or AttributeProtos."""
    import numpy as np
    from onnx import helper

    register_schemas()
    spec = OP_SPECS[op]
    node = helper.make_node(op, [p.name for p in spec.inputs], [p.name for p in spec.outputs], domain=DOMAIN)
    for name, value in attrs.items():
        node.attribute.append(value if isinstance(value, onnx.AttributeProto) else helper.make_attribute(name, value))
    query_type = helper.np_dtype_to_tensor_dtype(np.asarray(example[spec.inputs[0].name]).dtype)
    inputs = [
        helper.make_tensor_value_info(p.name, helper.np_dtype_to_tensor_dtype(np.asarray(example[p.name]).dtype),
                                      [None] * np.asarray(example[p.name]).ndim)
        for p in spec.inputs
    ]
    output_types = {"T": query_type, "tensor(int32)": onnx.TensorProto.INT32, "tensor(uint8)": onnx.TensorProto.UINT8}
    outputs = [
        helper.make_tensor_value_info(p.name, output_types[p.type_str], [None] * (3 if p.name == "blocks" else 4))
        for p in spec.outputs
    ]
    graph = helper.make_graph([node], f"one_{op}", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
                              ir_version=IR_VERSION)
    model = attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _collect_gsa_ops(graph, used: set) -> None:
    """gsa op types called in a graph or function body, their subgraphs included."""
    for node in graph.node:
        if node.domain == DOMAIN:
            used.add(node.op_type)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                _collect_gsa_ops(sub, used)


def export_onnx(
    model,
    args: tuple,
    path: Optional[str] = None,
    *,
    config=None,
    kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    device_type: str = "cpu",
    edit: Optional[Callable[[onnx.ModelProto], None]] = None,
) -> onnx.ModelProto:
    """Export a GSA model to ONNX; returns the model (and writes it to `path` unless None; weights
    of models past 2 GB go to `path`.data, and the returned model then references them).

    Every GSA site becomes a gsa-domain node (opset 1; docs/onnx.md) whose attributes carry the
    site's chunk size, budget, must-select blocks, block representation, scope, scale, softcap
    and thresholds, and the model holds a reference function for each gsa op, so stock
    onnxruntime runs the file as it is. `model` is a module (calling the gsa ops, or rewritten
    by gsa_compile.export with `config`) or an ExportedProgram; `dynamic_shapes` follows
    torch.export.

    A transformers causal LM is exported as its decode step (gsa_compile.onnx.DecodeStep: inputs
    input_ids, attention_mask, position_ids and past_key_values.{i}.*, outputs logits and
    present.{i}.*, one graph for prefill and decode), with `config` as for gsa_compile.optimize
    and `device_type` naming whose thresholds the graph carries; args are (input_ids,), used as
    the example when they have at least 2 rows and 2 tokens. The model is left as it was given.
    `edit(proto)`, when given, changes the graph in place before it is checked and written."""
    from .translation import translation_table

    register_schemas()
    if is_causal_lm(model):
        return _export_causal_lm(model, args, path, config, kwargs, dynamic_shapes, input_names, output_names,
                                 device_type)
    program = capture(model, args, config=config, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    refuse_complex(program)
    logger.info("exporting %d gsa nodes: %s", len(gsa_nodes(program)), sorted(set(gsa_nodes(program))))
    # optimize=False: onnxscript's optimizer rewrites x + c, x - c, x * c and x / c to x when c is
    # within 1e-8 of 0 or 1e-5 (relative) of 1, so Helium's RMSNorm (eps 1e-8) lost its epsilon and
    # a zero hidden row (the padding token's embedding) became 0 * inf = NaN. The graph is left as
    # torch translated it; onnxruntime's own graph optimizations (which keep that epsilon) run
    # when a session loads it.
    onnx_program = torch.onnx.export(
        program, dynamo=True, custom_translation_table=translation_table(),
        input_names=input_names, output_names=output_names, optimize=False, verbose=False,
    )
    if path is None:
        proto = _finish(onnx_program.model_proto, edit)
        onnx.checker.check_model(proto, full_check=True)
        return proto
    # torch writes the weights (as external data past 2 GB); the graph is then edited without
    # loading them, so models of any size keep their weights where torch put them.
    path = os.fspath(path)
    onnx_program.save(path)
    proto = _finish(onnx.load(path, load_external_data=False), edit)
    onnx.save(proto, path)
    onnx.checker.check_model(path, full_check=True)
    return proto


def refuse_complex(program: torch.export.ExportedProgram) -> None:
    """ONNX has no complex tensor type: a program that computes one (a rotary embedding written
    as complex multiplication) is refused, naming the first such op and the module it is in."""
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype.is_complex:
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else "the model"
            raise GSAError(
                f"{node.target} in {where} computes a {value.dtype} tensor; ONNX has no complex type, so this "
                f"model cannot be exported (a rotary embedding written with real cos/sin products can)"
            )


def is_causal_lm(model) -> bool:
    """A transformers model with a generation head (what DecodeStep exports)."""
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)


def _export_causal_lm(model, args, path, config, kwargs, dynamic_shapes, input_names, output_names, device_type):
    from ..capture.hf import restore_transformers
    from .decode import DecodeStep, export_decode_step

    name = type(model).__name__
    given = {"kwargs": kwargs, "dynamic_shapes": dynamic_shapes, "input_names": input_names,
             "output_names": output_names}
    fixed = sorted(key for key, value in given.items() if value is not None)
    if fixed:
        raise GSAError(
            f"{name} is a transformers causal LM: it is exported as a decode step whose inputs, outputs and "
            f"dynamic dims are fixed (docs/onnx.md), so {fixed} cannot be given; pass (input_ids,) and config"
        )
    ids = args[0] if args else None
    example = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 and min(ids.shape) >= 2 else None
    optimized_here = getattr(model, "gsa_runtime", None) is None
    try:
        step = DecodeStep(model, config, device_type=device_type)
        # The example gives shapes and values only; a strided view (ids[:, :8]) would fail inside
        # torch.export's input guards, so it is traced as a contiguous copy.
        example = None if example is None else example.to(torch.long).contiguous()
        return export_decode_step(step, path, example_ids=example)
    finally:
        if optimized_here and getattr(model, "gsa_runtime", None) is not None:
            restore_transformers(model)


def _finish(proto: onnx.ModelProto, edit: Optional[Callable[[onnx.ModelProto], None]] = None) -> onnx.ModelProto:
    proto = attach_functions(lift_codes_state(proto))
    if edit is not None:
        edit(proto)
    return proto
