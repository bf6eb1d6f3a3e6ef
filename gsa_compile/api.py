"""The user-facing entry points of the graph route: optimize, inspect, export.

    model = gsa_compile.optimize(model)                   # same model, GSA attention when decoding
    report = gsa_compile.inspect(model, *example_args)    # what would be rewritten, and why not
    program = gsa_compile.export(model, example_args)     # ExportedProgram with gsa nodes"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .capture.dynamo_backend import COMPILERS, gsa_backend, parameter_names, resolve_config_option
from .capture.export import export
from .config import GSAConfig
from .errors import GSAConfigError, GSAError, GSAInputError
from .passes import PassContext, run_pipeline
from .passes.codes_state import CodesState
from .report import Report

logger = logging.getLogger(__name__)

__all__ = ["optimize", "inspect", "export", "config_for_graph", "GSAHandle"]

# Layer types (transformers config.layer_types) whose attention GSA leaves dense: the window
# already bounds what they read.
WINDOWED_LAYER_TYPES = ("sliding", "chunked")


def _is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def config_for_graph(model: torch.nn.Module) -> GSAConfig:
    """GSAConfig.for_model(model) with the model's windowed layers (sliding or chunked attention,
    from the transformers config's layer_types) kept dense, for the graph routes."""
    config = GSAConfig.for_model(model)
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types and len(layer_types) == config.num_hidden_layers:
        ratios = [1 if any(kind in str(layer_type) for kind in WINDOWED_LAYER_TYPES) else ratio
                  for layer_type, ratio in zip(layer_types, config.top_k_ratio_per_layer)]
        config = config.replace(top_k_ratio_per_layer=ratios)
    return config


def _derived_config(model: torch.nn.Module) -> Optional[GSAConfig]:
    try:
        return config_for_graph(model)
    except GSAConfigError as exc:
        # No attention module to size from: the passes derive one from the sites they find.
        logger.info("GSA: %s; deriving the config from the captured graph instead", exc)
        return None


@dataclass(eq=False)
class GSAHandle:
    """What optimize attaches to a plain module as `model.gsa`: the Report of every graph
    compiled so far (reports), the codes state (codes: hash weights, codes buffers, keys
    encoded), the config, and release()."""

    config: Optional[GSAConfig]
    reports: list = field(default_factory=list)
    codes: CodesState = field(default_factory=CodesState)
    # Why a transformers model is served by this route rather than the Hugging Face one ("" for other modules).
    route_reason: str = ""
    _model: Any = field(default=None, repr=False)

    def release(self) -> None:
        """Undo optimize: the module runs its own forward again, uncompiled, and the codes
        buffers and hash weights are dropped."""
        model = self._model() if self._model is not None else None
        if model is not None:
            model._compiled_call_impl = None
            if model.__dict__.get("gsa") is self:
                del model.gsa
        self.codes.release()


def optimize(model: torch.nn.Module, config: Any = None, *, compiler: str = "inductor",
             mode: Optional[str] = None, tensor_parallel: Optional[tuple] = None) -> torch.nn.Module:
    """Make `model` use GSA attention, used exactly like before.

    transformers models go through the Hugging Face attention route
    (gsa_compile.capture.hf.optimize_transformers), except those whose attention modules do not
    call transformers' AttentionInterface (Bloom, MPT, Falcon, ...): they are compiled like any
    other module, with the reason logged and kept as `model.gsa.route_reason`. Any other nn.Module is compiled in place
    (nn.Module.compile) with the "gsa" torch.compile backend, which rewrites its attention and
    hands the graph to `compiler` ("inductor", "aot_eager" or "eager"), with torch.compile's
    `mode` ("reduce-overhead": CUDA graphs, for decode steps over static caches); the same object
    is returned, with `model.gsa` (a GSAHandle: reports, codes state, release()). config:
    GSAConfig, shipped name, JSON path, or None (GSAConfig.for_model, re-derived with the number
    of attention sites the graph holds). tensor_parallel: (rank, size) for a plain module built
    with this rank's share of the heads (see the backend's option; transformers models and
    DTensor-sharded modules need none)."""
    route_reason = ""
    if _is_transformers_model(model):
        from .capture.hf import not_interface_reason, optimize_transformers

        if tensor_parallel is not None:
            raise GSAConfigError(
                "tensor_parallel is for plain modules built with local heads: a transformers model's sites read "
                "their heads from its sharded (tp_plan) weights"
            )
        route_reason = not_interface_reason(model) or ""
        if not route_reason:
            return optimize_transformers(model, config)
        logger.warning("GSA: %s; compiling it with the FX route (the 'gsa' torch.compile backend) instead", route_reason)
    if not isinstance(model, torch.nn.Module):
        raise GSAInputError(f"optimize takes an nn.Module, got {type(model).__name__}")
    if compiler not in COMPILERS:
        raise GSAConfigError(f"compiler must be one of {list(COMPILERS)}, got {compiler!r}")
    if isinstance(model.__dict__.get("gsa"), GSAHandle):
        model.gsa.release()
    resolved = resolve_config_option(config)
    derived = resolved is None
    if derived:
        resolved = _derived_config(model)
    handle = GSAHandle(config=resolved, route_reason=route_reason, _model=weakref.ref(model))
    options = {"config": resolved, "config_derived": derived, "compiler": compiler, "reports": handle.reports,
               "parameter_names": parameter_names(model), "codes_state": handle.codes,
               "tensor_parallel": tensor_parallel}
    # torch.compile takes a mode or options, not both: the options travel with the backend.
    model.compile(backend=functools.partial(gsa_backend, options=options), mode=mode)
    model.gsa = handle
    return model


def inspect(model: torch.nn.Module, *example_args, config: Any = None, **example_kwargs) -> Report:
    """Run `model` once on the example inputs under a capturing backend and report every
    attention site (layer, pattern, policy) and every candidate left dense with the reason.
    Nothing is rewritten; the model is not modified. An explicit config that does not fit the
    graph's sites raises GSAConfigError (as torch.compile and export would)."""
    resolved = resolve_config_option(config)
    derived = resolved is None
    if derived:
        resolved = _derived_config(model) if _is_transformers_model(model) else None
    report = Report(route="inspect")
    names = parameter_names(model)

    def capture(gm, example_inputs):
        context = PassContext(route="inspect", config=resolved, config_derived=derived, rewrite=False,
                              whole_model=False, parameter_names=names)
        run_pipeline(gm, context)
        report.sites.extend(context.report.sites)
        report.unmatched.extend(context.report.unmatched)
        return gm.forward

    try:
        with torch.no_grad():
            torch.compile(model, backend=capture, dynamic=False)(*example_args, **example_kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        # The passes' own errors (a config that does not fit) reach the caller as themselves.
        if isinstance(exc.inner_exception, GSAError):
            raise exc.inner_exception from None
        raise
    return report
