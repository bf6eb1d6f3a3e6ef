"""The "gsa" attention function registered with transformers' AttentionInterface.

Every attention module of an optimized model calls `gsa_attention_forward` instead of its
original function. Each forward pass of the model carries one `DecodeStep` (the optimized
forward puts it into the call's keyword arguments, which transformers passes down to every
attention call; for models whose layers drop them, a per-thread current step in eager): the call's cache, whose layers hold the codes of their keys, the decode
plan every layer of the step shares (gsa_compile.decode: mask form, dense-or-sparse decision,
blocks per row) and the selections made in this pass (for layers that reuse them). Nothing of
a call is kept on the model, so threads and copies of a model never see each other's calls.

Per call, in this order (the first that applies wins):
- dense layer, prefill (more than one query token), training with dropout, or a feature the
  sparse path does not implement (attention weights asked for, sliding window, position bias,
  per-token sinks, a non-tensor mask): the original function runs unchanged (sdpa or the model's
  own eager); attention sinks of one logit per query head (`s_aux`, gpt-oss and others) are
  added exactly by the sparse path;
- the step's plan says dense (thresholds, decided once per step): the original function too,
  or, when the decision was made on the device, the sparse kernels over every filled block;
- a selecting layer: gsa::select_blocks over the cache's codes, then gsa::sparse_attention;
- a reusing layer: gsa::sparse_attention over the selection its source layer made in this step.

Masks come from the original implementation's mask function (registered under the same name),
so the original dense path receives exactly what it always did.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .. import decode, mla, ops
from ..errors import GSAConfigError, GSAError
from ..kernels import common
from . import hf_mla
from .hf_cache import CodesMixin
from .hf_sites import SITE_ATTRIBUTE, GSARuntime, GSASite, device_count_increment, tiles_cached_heads

logger = logging.getLogger(__name__)

# Original implementations whose masks the sparse path understands (4D bool or additive).
SUPPORTED_ORIGINALS = ("sdpa", "eager")

# Keyword arguments that change attention semantics in ways the sparse path does not implement.
DENSE_ONLY_KWARGS = (
    "sliding_window", "s_aux", "sinks", "position_bias", "head_mask", "indices", "block_indices",
)
# Attention sinks (a logit per query head joining the softmax denominator), under the names
# models pass them: the HF route's sparse path adds them exactly (gsa::sparse_attention's sinks).
SINK_KWARGS = ("s_aux", "sinks")

# The keyword argument that carries a forward pass's DecodeStep down to the attention calls.
STEP_KWARG = "gsa_step"

# The step of the forward pass running in this thread, for models whose layers do not pass
# keyword arguments down to attention (eager only: per thread, so threads never share it).
_CURRENT = threading.local()


@contextlib.contextmanager
def current_step(step: "DecodeStep"):
    previous = getattr(_CURRENT, "step", None)
    _CURRENT.step = step
    try:
        yield
    finally:
        _CURRENT.step = previous

# Dense reasons under which a decode may take the fast dense path: the attention's semantics
# are the model's plain ones (other reasons keep the model's own function).
FAST_DENSE_REASONS = ("dense_layer", "short", "concurrency")

_LOGGED: set = set()


class DecodeStep:
    """One forward pass of an optimized model: its cache, the decode plan its layers share and
    the selections they make. Pass one as `gsa_step=` to a forward call to read `selections`
    afterwards; otherwise the model makes a fresh one per call."""

    def __init__(self, runtime: GSARuntime, cache=None):
        self.runtime = runtime
        self.cache = getattr(cache, "self_attention_cache", cache)
        self.selections: dict[int, torch.Tensor] = {}  # layer -> int32 [B, Hkv, width]
        self._plans: list = []  # (num_keys, thresholds, plan)
        self._increments: list = []  # (plan, device_count_increment of the plan)

    def plan(self, query, num_keys: int, attention_mask, options: dict) -> decode.DecodePlan:
        """The step's decode plan for this cache length (the same for all its full-attention layers)."""
        thresholds = (options["chunk_size"], options["seq_len_threshold"], options["concurrency_threshold"])
        # Found by comparison, not by hashing: while compiling, num_keys is symbolic, and hashing
        # it would pin the compiled step to one cache length (a recompile every decode step).
        for known_keys, known_thresholds, plan in self._plans:
            if known_thresholds == thresholds and known_keys == num_keys:
                return plan
        plan = decode.plan_decode(query, num_keys, _decode_mask(attention_mask, query, num_keys), False, *thresholds)
        self._plans.append((num_keys, thresholds, plan))
        return plan

    def count_increment(self, plan: decode.DecodePlan) -> torch.Tensor:
        """What each layer deciding by this device plan adds to its counters (made once)."""
        for known, increment in self._increments:
            if known is plan:
                return increment
        increment = device_count_increment(plan.device_counts())
        self._increments.append((plan, increment))
        return increment

    def codes(self, site: GSASite):
        """(codes, norms) of the site's layer in this call's cache, or (None, None)."""
        layers = getattr(self.cache, "layers", ())
        layer = layers[site.layer] if site.layer < len(layers) else None
        if not isinstance(layer, CodesMixin) or layer.gsa_site is not site:
            return None, None
        return layer.codes, layer.key_norms



def implementation_name(original: str) -> str:
    """The attention implementation an optimized model runs: "gsa" over sdpa, "gsa_eager" over
    the model's eager attention."""
    if original not in SUPPORTED_ORIGINALS:
        raise GSAConfigError(
            f"attention implementation {original!r} cannot be wrapped by GSA; supported: "
            f"{list(SUPPORTED_ORIGINALS)} (model.set_attn_implementation('sdpa') before optimizing)"
        )
    name = "gsa" if original == "sdpa" else f"gsa_{original}"
    AttentionInterface.register(name, gsa_attention_forward)
    # Dense layers and prefill must see the masks their original function always saw.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def gsa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    site: Optional[GSASite] = getattr(module, SITE_ATTRIBUTE, None)
    if site is None:
        raise GSAError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs the GSA attention "
            f"implementation but has no GSA site; optimize the model with gsa_compile.optimize(model)"
        )
    step: Optional[DecodeStep] = kwargs.pop(STEP_KWARG, None) or getattr(_CURRENT, "step", None)
    reason = _call_dense_reason(site, module, query, attention_mask, dropout, kwargs, step)
    tiles = 1
    if reason is None and site.policy != "dense":
        tiles = cached_head_tiles(module, key, site)
        if tiles is None:
            reason = "kv_heads_repeated"
    plan = None
    if reason is None:
        options = site.attention_kwargs(query.device.type)
        plan = step.plan(query, key.shape[2], attention_mask, options)
        if not plan.host_sparse and plan.dense != "device":
            reason = plan.dense
    sparse_query, sparse_key, sparse_value, bias, sinks = query, key, value, None, _sinks(kwargs)
    if reason is None:
        bias = plan.bias
        if tiles > 1:
            sparse_query, sparse_key, sparse_value, bias, sinks = untiled(
                query, key, value, bias, sinks, site.shape.kv_heads, tiles)
        reason, blocks = _selection(site, module, step, plan, sparse_query, options)
    if reason is not None:
        _count_dense(site, reason, query, key, value)
        if reason in FAST_DENSE_REASONS and site.runtime.original_implementation == "sdpa":
            fast = _fast_dense_decode(query, key, value, attention_mask, scaling, kwargs)
            if fast is not None:
                return fast, None
        return site.dense_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    step.selections[site.layer] = blocks
    out = ops.sparse_attention(sparse_query, sparse_key, sparse_value, blocks, plan.valid, bias, options["chunk_size"],
                               scaling, kwargs.get("softcap"), sinks)
    if tiles > 1:
        out = head_order(out, tiles, site.shape.kv_heads, inverse=True)
    _count_sparse(site, step, plan, blocks, sparse_key, sparse_value, options["chunk_size"])
    return out.transpose(1, 2).contiguous(), None


def cached_head_tiles(module, key, site: GSASite) -> Optional[int]:
    """How many times the module tiled its cached KV heads before attention (key head j is
    cached head j % Hkv; 1: keys are the cached heads), or None where keys have more heads for a
    reason not proven here. The HF route and the ONNX export share this rule."""
    kv_heads = site.shape.kv_heads
    if key.shape[1] == kv_heads:
        return 1
    if key.shape[1] % kv_heads or not tiles_cached_heads(type(module)):
        return None
    return key.shape[1] // kv_heads


def head_order(x: Optional[torch.Tensor], tiles: int, kv_heads: int, inverse: bool = False):
    """Heads [B, tiles * Hkv * G, ...] ordered tile-major (head i reads cached head (i // G) % Hkv)
    -> KV-head-major (the G * tiles heads of cached head h together), or back with inverse."""
    if x is None or x.shape[1] == 1:
        return x
    batch, heads = x.shape[0], x.shape[1]
    groups = heads // (tiles * kv_heads)
    outer, inner = (kv_heads, tiles) if inverse else (tiles, kv_heads)
    split = x.reshape(batch, outer, inner, groups, *x.shape[2:])
    return split.transpose(1, 2).reshape(x.shape)


def untiled(query, key, value, bias, sinks, kv_heads: int, tiles: int):
    """A call over tiled KV heads as one over the cached heads: the first tile of K and V (the
    cache itself) and the query heads (their bias and sinks) grouped by the cached head they read;
    head_order(out, tiles, kv_heads, inverse=True) puts the call's output heads back."""
    if sinks is not None:
        sinks = head_order(sinks.view(1, -1), tiles, kv_heads).view(-1)
    return (head_order(query, tiles, kv_heads), key[:, :kv_heads], value[:, :kv_heads],
            head_order(bias, tiles, kv_heads), sinks)


def _fast_dense_decode(query, key, value, attention_mask, scaling, kwargs) -> Optional[torch.Tensor]:
    """A masked single-token decode on an accelerator through gsa's dense decode (the sparse
    kernel over every filled block: GQA without repeating K/V, which transformers' sdpa path
    does under a mask), or None where the model's own function must run."""
    if query.shape[2] != 1 or not isinstance(attention_mask, torch.Tensor) or query.device.type == "cpu":
        return None
    mask = _decode_mask(attention_mask, query, key.shape[2])
    out = ops.dense_decode_attention(query, key, value, mask, scaling, kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous()


def _selection(site: GSASite, module, step: DecodeStep, plan: decode.DecodePlan, query, options: dict):
    """(dense reason, None) or (None, blocks) for a layer that runs sparse this step."""
    budget = (options["top_k_ratio"], options["budget_tokens"], options["must_select"])
    if site.policy == "reuse":
        source = step.selections.get(site.runtime.config.selection_source(site.layer))
        if source is None:
            return "reuse_source_dense", None
        return None, decode.truncate(source, plan.num_blocks(*budget), plan.limit(*budget))
    codes, norms = step.codes(site)
    if codes is None:
        return "no_codes", None
    if site.latent is not None:
        return None, mla.latent_select_blocks(
            query, hf_mla.key_up_projection(site.latent, module), site.latent.nope_dim, codes, site.hash_weight,
            plan.valid, norms, options["chunk_size"], plan.num_blocks(*budget), list(options["must_select"]),
            options["repre"], plan.limit(*budget),
        )
    blocks = ops.select_blocks(
        query, codes, site.hash_weight, plan.valid, norms, options["chunk_size"], plan.num_blocks(*budget),
        list(options["must_select"]), options["repre"], options["scope"], plan.limit(*budget),
    )
    return None, blocks


def _sinks(kwargs) -> Optional[torch.Tensor]:
    """The call's sink logits [Hq] (plain_attention_reason has let only that shape through)."""
    return next((kwargs[name] for name in SINK_KWARGS if kwargs.get(name) is not None), None)


def _sink_reason(name: str, sinks, query) -> Optional[str]:
    """Why the sparse path cannot add these sinks (it takes one float logit per query head)."""
    if isinstance(sinks, torch.Tensor) and sinks.is_floating_point() and tuple(sinks.shape) == (query.shape[1],):
        return None
    shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
    return f"{name} of shape {shape} (the sparse path adds one sink logit per query head, [{query.shape[1]}])"


def _decode_mask(attention_mask, query, num_keys: int) -> Optional[torch.Tensor]:
    """The mask row of a single-query call as [B, 1 or Hq, 1, L] (a tensor mask only)."""
    if not isinstance(attention_mask, torch.Tensor) or query.shape[2] != 1:
        return None
    return common.mask_to_4d(attention_mask)[..., -1:, :num_keys]


def plain_attention_reason(site, module, attention_mask, dropout, kwargs, query=None) -> Optional[tuple[str, str]]:
    """(decode.DENSE_REASONS key, what exactly) when a layer's call must be the model's own
    attention whatever its inputs' length (policy, or a feature the sparse path does not
    implement), else None. The HF route and the ONNX export share these rules; given the call's
    `query`, attention sinks of one logit per query head are implemented (the HF route)."""
    if site.policy == "dense":
        return "dense_layer", "dense layer"
    if module.training and dropout:
        return "dropout", "training with attention dropout"
    if kwargs.get("output_attentions"):
        return "attention_weights", "attention weights requested"
    for name in DENSE_ONLY_KWARGS:
        if kwargs.get(name) is None:
            continue
        if name in SINK_KWARGS and query is not None:
            why = _sink_reason(name, kwargs[name], query)
            if why is None:
                continue
            return "unsupported_kwarg", why
        return "unsupported_kwarg", f"{name} is not implemented by the sparse path"
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return "mask_type", f"mask of type {type(attention_mask).__name__}"
    return None


def _call_dense_reason(site, module, query, attention_mask, dropout, kwargs, step) -> Optional[str]:
    """Why this call runs dense whatever the cache holds (a decode.DENSE_REASONS key), or None."""
    if site.policy == "dense":
        return "dense_layer"
    if query.shape[2] != 1:
        return "prefill"
    plain = plain_attention_reason(site, module, attention_mask, dropout, kwargs, query)
    if plain is not None:
        if plain[0] == "unsupported_kwarg":
            _log_once(site, plain[1], "GSA layer %d runs dense: %s", site.layer, plain[1])
        return plain[0]
    if step is None:
        _log_once(site, "no_step", "GSA layer %d runs dense: %s does not pass keyword arguments down to its "
                  "attention, and a compiled forward cannot hand the call's GSA state over otherwise",
                  site.layer, type(module).__name__)
        return "no_step"
    return None


def _count_dense(site: GSASite, reason: str, query, key, value) -> None:
    site.count(reason)
    if site.runtime.collect_stats and query.shape[2] == 1:
        site.count("dense_kv_bytes", _kv_bytes(key, value, key.shape[2]))
    if reason not in ("dense_layer", "prefill"):
        _log_once(site, reason, "GSA layer %d runs dense: %s", site.layer, decode.DENSE_REASONS[reason])


def _count_sparse(site: GSASite, step: DecodeStep, plan: decode.DecodePlan, blocks, key, value, chunk_size: int) -> None:
    if plan.dense == "device":
        # A sparse call, or a dense one for either threshold reason: one add for all of them.
        site.add_counts(step.count_increment(plan))
    else:
        site.count("sparse_calls")
    if not site.runtime.collect_stats:
        return
    num_keys = key.shape[2]
    starts = blocks.clamp(min=0).to(torch.int64) * chunk_size
    tokens = ((num_keys - starts).clamp(max=chunk_size) * (blocks >= 0)).sum()
    site.count("sparse_kv_bytes", tokens * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size()))
    codes, _ = step.codes(site.source())
    if codes is not None:
        site.count("code_bytes", codes.numel() * codes.element_size())


def _kv_bytes(key, value, num_keys: int) -> int:
    rows = key.shape[0] * key.shape[1]
    return rows * num_keys * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())


def _log_once(site: GSASite, what: str, message: str, *args) -> None:
    if (site.layer, what) not in _LOGGED:
        _LOGGED.add((site.layer, what))
        logger.info(message, *args)
