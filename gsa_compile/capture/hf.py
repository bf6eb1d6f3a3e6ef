"""The Hugging Face route: GSA for transformers models through their attention interface.

    model = optimize_transformers(model)            # or (model, "Qwen/Qwen3-4B"), (model, GSAConfig(...))
    model.generate(ids, max_new_tokens=64)          # greedy, sampling, beams, left padding
    print(model.gsa_report)                         # which layers are sparse, reuse or dense

No graph capture is needed: transformers routes every attention call through its
AttentionInterface, so the model keeps its code and gets a "gsa" implementation (hf_attention),
a GSA site per attention module (hf_sites) and a codes state in its KV cache (hf_cache).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types
from typing import Optional, Union

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from ..config import GSAConfig, load_config
from ..errors import GSAConfigError, GSAError
from ..report import Report, Site
from . import hf_attention
from .hf_cache import attach_codes
from .hf_sites import (
    SITE_ATTRIBUTE,
    GSARuntime,
    GSASite,
    attention_modules,
    check_layers,
    effective_policies,
    model_eager_function,
    site_shape,
)

logger = logging.getLogger(__name__)

ROUTE = "hf_interface"
# Names models use for the cache argument of forward (transformers 5.24 renamed it).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def optimize_transformers(model: nn.Module, config: Union[GSAConfig, str, None] = None) -> nn.Module:
    """Make a transformers model decode with GSA; returns the same model object.

    config: a GSAConfig, a shipped config name or JSON path (gsa_compile.load_config), or None
    for GSAConfig.for_model(model) (the seed's policy: first 2 and last 3 layers dense).
    The model gets `gsa_report` (a Report) and `gsa_runtime` (policies, stats)."""
    if getattr(model, "gsa_runtime", None) is not None:
        restore_transformers(model)
    config = _resolve_config(model, config)
    model_name = type(model).__name__
    modules = attention_modules(model)
    if not modules:
        raise GSAError(f"{model_name} has no attention module that calls transformers' AttentionInterface")
    by_layer = {module.layer_idx: (path, module) for path, module in modules}
    if len(by_layer) != len(modules):
        raise GSAError(f"{model_name}: several attention modules share a layer_idx: {[p for p, _ in modules]}")
    check_layers(config, {layer: module for layer, (_, module) in by_layer.items()}, model_name)

    original = model.config._attn_implementation
    implementation = hf_attention.implementation_name(original)
    runtime = GSARuntime(config, original, implementation)
    runtime.forward_takes_kwargs = _takes_kwargs(model)
    policies = effective_policies(config, {layer: module for layer, (_, module) in by_layer.items()})
    report = Report(route=ROUTE)
    for layer, (path, module) in sorted(by_layer.items()):
        policy, note = policies[layer]
        site = _build_site(runtime, module, layer, policy, note, original)
        runtime.sites[layer] = site
        report.sites.append(Site(
            layer=layer, pattern=ROUTE, policy=policy, module_path=path,
            reuse_of=config.selection_source(layer) if policy == "reuse" else None,
            gqa_groups=site.shape.query_heads // site.shape.kv_heads, note=note,
        ))
    for layer, (_, module) in by_layer.items():
        # On the module's device from the start: its hash weight and counters are read there.
        parameter = next(module.parameters(), None)
        site = runtime.sites[layer] if parameter is None else runtime.sites[layer].to(parameter.device)
        module.add_module(SITE_ATTRIBUTE, site)

    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        restore_transformers(model, runtime)
        raise GSAError(
            f"{model_name} did not accept attention implementation {implementation!r} (it does not route "
            f"attention through transformers' AttentionInterface)"
        )
    model.forward = types.MethodType(_stepping_forward(type(model).forward), model)
    model.gsa_runtime = runtime
    model.gsa_report = report
    logger.info("GSA on %s:\n%s", model_name, report.table())
    return model


def restore_transformers(model: nn.Module, runtime: Optional[GSARuntime] = None) -> nn.Module:
    """Undo optimize_transformers: the original attention implementation, no sites, no hook.
    A model that is not optimized (or already restored) is returned unchanged."""
    runtime = runtime or getattr(model, "gsa_runtime", None)
    if runtime is None:
        return model
    for _, module in attention_modules(model):
        if isinstance(getattr(module, SITE_ATTRIBUTE, None), GSASite):
            delattr(module, SITE_ATTRIBUTE)
    if model.config._attn_implementation != runtime.original_implementation:
        model.set_attn_implementation(runtime.original_implementation)
    for name in ("forward", "gsa_runtime", "gsa_report"):
        if name in model.__dict__:
            delattr(model, name)
    return model


@contextlib.contextmanager
def gsa_disabled(model: nn.Module):
    """Run an optimized model with its original attention inside the block, e.g. to compare
    dense and GSA decoding. Plain caches stay plain; a cache that already holds codes keeps
    encoding the keys that enter it, so GSA can resume on it afterwards."""
    runtime: GSARuntime = model.gsa_runtime
    model.set_attn_implementation(runtime.original_implementation)
    runtime.enabled = False
    try:
        yield model
    finally:
        runtime.enabled = True
        model.set_attn_implementation(runtime.implementation)


def cache_argument(model: nn.Module) -> str:
    """The name of model.forward's cache argument: `cache` in transformers 5.24, `past_key_values`
    in earlier 5.x releases."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), CACHE_ARGUMENTS[-1])


def _build_site(runtime: GSARuntime, module: nn.Module, layer: int, policy: str, note: str, original: str) -> GSASite:
    eager = model_eager_function(module)
    if original == "eager" and eager is None:
        raise GSAError(
            f"{type(module).__name__} runs eager attention but its modeling file has no "
            f"eager_attention_forward to keep as the dense path"
        )
    dense_fn = AttentionInterface().get_interface(original, eager)
    key_builder = module.expand_kv if hasattr(module, "expand_kv") else None
    return GSASite(runtime, layer, policy, site_shape(module), dense_fn, key_builder=key_builder, note=note)


def _stepping_forward(forward):
    """The optimized model's forward: _begin_step, then the class's own forward. An instance
    attribute rather than a hook, so torch.compile(model.forward) by hand gets it too; it keeps
    the original signature (transformers inspects it) and reads the runtime from the model it
    is bound to, so a copy of the model (copy.deepcopy) drives its own sites."""

    @functools.wraps(forward)
    def stepping_forward(self, *args, **kwargs):
        kwargs = _begin_step(self, kwargs)
        step = kwargs.get(hf_attention.STEP_KWARG)
        if step is None or torch.compiler.is_compiling():
            return forward(self, *args, **kwargs)
        with hf_attention.current_step(step):
            return forward(self, *args, **kwargs)

    return stepping_forward


def _begin_step(model: nn.Module, kwargs: dict) -> dict:
    """Give the call's cache its codes layers and the call its DecodeStep."""
    runtime = getattr(model, "gsa_runtime", None)
    if runtime is None or not runtime.enabled:
        return kwargs
    # Plain loops: this runs inside compiled decode steps, where dynamo traces no generators.
    cache = None
    for name in CACHE_ARGUMENTS:
        if isinstance(kwargs.get(name), Cache):
            cache = kwargs[name]
    if cache is not None:
        attach_codes(cache, runtime)
    if kwargs.get(hf_attention.STEP_KWARG) is None and runtime.forward_takes_kwargs:
        kwargs = {**kwargs, hf_attention.STEP_KWARG: hf_attention.DecodeStep(runtime, cache)}
    return kwargs


def _takes_kwargs(model: nn.Module) -> bool:
    """Whether model.forward takes **kwargs (which transformers hands down to attention)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


def _resolve_config(model: nn.Module, config: Union[GSAConfig, str, None]) -> GSAConfig:
    if config is None:
        return GSAConfig.for_model(model)
    if isinstance(config, str):
        config = load_config(config)
    if not isinstance(config, GSAConfig):
        raise GSAConfigError(
            f"config must be a GSAConfig, a shipped config name or JSON path, or None; got {type(config).__name__}"
        )
    name = getattr(model.config, "_name_or_path", "") or ""
    if name and config.model_name not in ("custom", name):
        logger.warning(
            "GSA config %r was made for another model than %r; its layer policy and budgets may not fit",
            config.model_name, name,
        )
    return config
