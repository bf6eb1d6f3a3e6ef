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
import copy
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
from . import hf_attention, hf_mla
from .hf_cache import attach_codes
from .hf_sites import (
    SITE_ATTRIBUTE,
    GSARuntime,
    GSASite,
    attention_owner,
    check_layers,
    discover,
    effective_policies,
    model_eager_function,
    model_layer_count,
    passes_key_selection,
    site_shape,
)

logger = logging.getLogger(__name__)

ROUTE = "hf_interface"
# Names models use for the cache argument of forward (transformers 5.24 renamed it).
CACHE_ARGUMENTS = ("cache", "past_key_values")
CROSS_ATTENTION_NOTE = "cross-attention (encoder states, no decoder cache): kept dense"


def optimize_transformers(model: nn.Module, config: Union[GSAConfig, str, None] = None) -> nn.Module:
    """Make a transformers model decode with GSA; returns the same model object.

    config: a GSAConfig, a shipped config name or JSON path (gsa_compile.load_config), or None
    for GSAConfig.for_model(model) (the UCM GSA config format's default policy: first 2 and last 3 layers dense).
    The model gets `gsa_report` (a Report) and `gsa_runtime` (policies, stats), and a copy of
    its config: transformers keeps the attention implementation there, and other models built
    from the same config object keep theirs."""
    if getattr(model, "gsa_runtime", None) is not None:
        restore_transformers(model)
    model_name = type(model).__name__
    found = discover(model)
    if not found.self_attention and not found.not_routed:
        raise GSAError(f"{model_name} has no attention module (its layers are state-space or recurrent): GSA has nothing to do")
    not_served = not_interface_reason(model, found)
    if not_served is not None:
        raise GSAError(
            f"{not_served}; gsa_compile.optimize(model) compiles it with the FX route instead (as "
            f"torch.compile(model, backend='gsa') does)"
        )
    by_layer = {module.layer_idx: (path, module) for path, module in found.self_attention}
    layers = sorted(by_layer)
    num_layers = model_layer_count(model, layers)
    config = _resolve_config(model, config, num_layers)
    check_layers(config, layers, num_layers, model_name)
    if found.not_routed:
        logger.warning(
            "%s: attention modules %s do not call transformers' AttentionInterface; they stay as they are",
            model_name, found.not_routed,
        )

    owner = attention_owner(model)
    original = owner.config._attn_implementation
    implementation = hf_attention.implementation_name(original)
    runtime = GSARuntime(config, original, implementation)
    runtime.forward_takes_kwargs = _takes_kwargs(model)
    modules = {layer: module for layer, (_, module) in by_layer.items()}
    policies = effective_policies(config, modules, model.config)
    report = Report(route=ROUTE)
    attached = []
    for layer, (path, module) in sorted(by_layer.items()):
        policy, note = policies[layer]
        site = _build_site(runtime, module, layer, policy, note, original, model.config)
        runtime.sites[layer] = site
        attached.append((module, site))
        report.sites.append(_report_site(site, path, config))
    key_dims = {site.shape.key_dim for site in runtime.computing_sites()}
    if len(key_dims) == 1:
        # One key width across the model: the config must be made for it (models whose layers
        # differ, e.g. Gemma 4, size each site's hash weights from its own keys).
        config.check_key_dim(runtime.computing_sites()[0].layer, key_dims.pop())
    for path, module in found.cross_attention:
        # Cross-attention reads encoder states, not the decoder's cache: its site only keeps the
        # original function. It is no runtime site (runtime.sites is keyed by self-attention layer).
        site = _build_site(runtime, module, module.layer_idx, "dense", CROSS_ATTENTION_NOTE, original, model.config)
        attached.append((module, site))
        report.sites.append(_report_site(site, path, config))
    for module, site in attached:
        # On the module's device from the start: its hash weight and counters are read there.
        parameter = next(module.parameters(), None)
        site = site if parameter is None else site.to(parameter.device)
        module.add_module(SITE_ATTRIBUTE, site)

    own_configs(model)
    owner.set_attn_implementation(implementation)
    if owner.config._attn_implementation != implementation:
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


def own_configs(model: nn.Module) -> None:
    """Give the model and its modules a copy of the config objects they hold: transformers keeps
    the attention implementation on the config, and another model built from the same config
    object (a dense reference, say) must keep its own attention."""
    copies: dict = {}
    copy.deepcopy(model.config, copies)  # fills `copies`: id of each config object -> its copy
    for module in model.modules():  # the model itself first
        held = module.__dict__.get("config")
        if held is not None and id(held) in copies:
            module.config = copies[id(held)]


def not_interface_reason(model: nn.Module, found=None) -> Optional[str]:
    """Why this route cannot serve the model, which the FX route may (it captures the model's own
    code): no attention module calls transformers' AttentionInterface, or several self-attention
    modules share a layer_idx (one module per cache layer is what a site keeps codes for; a
    recurrent model runs its modules over several cache layers). None when the route serves it,
    or when it has no attention module at all."""
    found = discover(model) if found is None else found
    model_name = type(model).__name__
    if not found.self_attention and found.not_routed:
        listed = ", ".join(found.not_routed[:3]) + (", ..." if len(found.not_routed) > 3 else "")
        return (f"{model_name} has no self-attention module that calls transformers' AttentionInterface "
                f"({listed} compute attention themselves)")
    layers = [module.layer_idx for _, module in found.self_attention]
    if len(set(layers)) != len(layers):
        shared = sorted({layer for layer in layers if layers.count(layer) > 1})
        return (f"{model_name}: several self-attention modules share a layer_idx ({shared}); a site keeps the "
                f"codes of one cache layer, so each self-attention module must have its own")
    return None


def restore_transformers(model: nn.Module, runtime: Optional[GSARuntime] = None) -> nn.Module:
    """Undo optimize_transformers: the original attention implementation, no sites, no hook.
    A model that is not optimized (or already restored) is returned unchanged."""
    runtime = runtime or getattr(model, "gsa_runtime", None)
    if runtime is None:
        return model
    for module in list(model.modules()):
        if isinstance(getattr(module, SITE_ATTRIBUTE, None), GSASite):
            delattr(module, SITE_ATTRIBUTE)
    owner = attention_owner(model)
    if owner.config._attn_implementation != runtime.original_implementation:
        owner.set_attn_implementation(runtime.original_implementation)
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
    owner = attention_owner(model)
    owner.set_attn_implementation(runtime.original_implementation)
    runtime.enabled = False
    try:
        yield model
    finally:
        runtime.enabled = True
        owner.set_attn_implementation(runtime.implementation)


def cache_argument(model: nn.Module) -> str:
    """The name of model.forward's cache argument: `cache` in transformers 5.24, `past_key_values`
    in earlier 5.x releases."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), CACHE_ARGUMENTS[-1])


def _build_site(
    runtime: GSARuntime, module: nn.Module, layer: int, policy: str, note: str, original: str, model_config
) -> GSASite:
    eager = model_eager_function(module)
    if original == "eager" and eager is None:
        raise GSAError(
            f"{type(module).__name__} runs eager attention but its modeling file has no "
            f"eager_attention_forward to keep as the dense path"
        )
    dense_fn = AttentionInterface().get_interface(original, eager)
    if passes_key_selection(type(module)):
        dense_fn = _with_index_mask(dense_fn)
    key_builder = module.expand_kv if hasattr(module, "expand_kv") else None
    shape = site_shape(module, model_config)
    latent = hf_mla.latent_layout(module, runtime.config, shape.shard)[0] if policy != "dense" else None
    if latent is not None and policy == "sparse":
        code_bytes = (runtime.config.hash_bits_kv_lora + runtime.config.hash_bits_qk_rope) // 8
        note = "; ".join(filter(None, [note, f"MLA latent-space selection: one {code_bytes}-byte code per token "
                                             f"for all {latent.heads} heads"]))
    return GSASite(runtime, layer, policy, shape, dense_fn, key_builder=key_builder, note=note, latent=latent)


def _report_site(site: GSASite, path: str, config: GSAConfig) -> Site:
    return Site(
        layer=site.layer, pattern=ROUTE, policy=site.policy, module_path=path,
        reuse_of=config.selection_source(site.layer) if site.policy == "reuse" else None,
        gqa_groups=site.shape.query_heads // site.shape.kv_heads, note=site.note,
    )


def _with_index_mask(dense_fn):
    """The dense path of a layer with its own key selection (DSA-style indexers: DeepSeek-V3.2,
    GLM-MoE-DSA, MiniMax-M3, ...). Under an implementation it does not know, such a model hands
    the selection over (`indices` [B, T, topk] or `block_indices`) instead of masking the other
    keys itself; this masks them exactly as the model does for eager and sdpa."""

    def dense_with_index_mask(module, query, key, value, attention_mask, **kwargs):
        indices = kwargs.pop("indices", None)
        block_indices = kwargs.pop("block_indices", None)
        if indices is not None:
            unselected = (
                indices.new_ones((query.shape[0], query.shape[2], key.shape[2]), dtype=torch.bool)
                .scatter(-1, indices.long(), False)
                .unsqueeze(1)
            )
            if attention_mask is None:
                attention_mask = ~unselected
            elif attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & ~unselected
            else:
                attention_mask = attention_mask.masked_fill(unselected, torch.finfo(query.dtype).min)
        if block_indices is not None:
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(key.shape[2] - query.shape[2], key.shape[2], device=query.device)
            position_ids = (position_ids if position_ids.ndim > 1 else position_ids.unsqueeze(0)).expand(
                query.shape[0], -1
            )
            attention_mask = module.indexer.build_block_mask(
                block_indices, attention_mask, key.shape[2], query.dtype, query.device, position_ids
            )
        return dense_fn(module, query, key, value, attention_mask, **kwargs)

    return dense_with_index_mask


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


def _resolve_config(model: nn.Module, config: Union[GSAConfig, str, None], num_layers: int) -> GSAConfig:
    """The config to run: as given (a name or path loaded), or derived from the model with one
    layer entry per model layer (`num_layers`, attention or not)."""
    if config is None:
        derived = GSAConfig.for_model(model)
        if derived.num_hidden_layers != num_layers:
            derived = derived.replace(num_hidden_layers=num_layers)
        return derived
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
