"""torch.export route: an ExportedProgram whose graph holds GSA sites.

    program = gsa_compile.export(model, (input_ids,), config=cfg)
    program.module()(input_ids)           # runs gsa::attention at every sparse/reuse layer
    program.gsa_report                     # the sites found, their policy, what was left dense

The model is exported first (SDPA stays one aten node: export does not decompose it), the pass
pipeline rewrites the unlifted graph module, and that module is exported again, so the result
is an ordinary ExportedProgram (parameters, buffers, hash weights and buffer mutations lifted as
usual) that torch.export tooling, AOTInductor and the ONNX exporter accept."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..passes import PassContext, run_pipeline
from .dynamo_backend import resolve_config_option


def export(
    model: torch.nn.Module,
    args: tuple,
    kwargs: Optional[dict] = None,
    config: Any = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """Export `model` with every attention site rewritten by the GSA passes.

    config: GSAConfig, shipped config name, JSON path, or None (derived: GSAConfig.for_model for
    transformers models, else one layer per site found). The returned program carries the
    rewrite's Report as `program.gsa_report`."""
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = kwargs or {}
    context = _context_for(model, config)
    first = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    graph_module = run_pipeline(first.module(), context)
    program = torch.export.export(graph_module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    program.gsa_report = context.report
    program.gsa_codes_state = context.state
    return program


def _context_for(model, config) -> PassContext:
    resolved = resolve_config_option(config)
    derived = False
    if resolved is None and hasattr(getattr(model, "config", None), "model_type"):
        from ..api import config_for_graph

        resolved, derived = config_for_graph(model), True
    return PassContext(route="torch.export", config=resolved, config_derived=derived, whole_model=True)
