"""The "gsa" attention function registered with transformers' AttentionInterface.

Every attention module of an optimized model calls `gsa_attention_forward` instead of its
original function. Per call it decides, in this order (the first that applies wins):

- dense layer, prefill (more than one query token), training with dropout, or a feature the
  sparse path does not implement (attention weights asked for, sliding window, sinks, position
  bias, a non-tensor mask): the original function runs unchanged (sdpa or the model's own eager);
- fewer keys than the device's seq_len_threshold, or fewer long rows than its
  concurrency_threshold (DESIGN 2.10): the original function too;
- a selecting layer: torch.ops.gsa.attention over the cache's codes;
- a reusing layer: torch.ops.gsa.sparse_attention over the selection its source layer made in
  this same forward pass.

Masks come from the original implementation's mask function (registered under the same name),
so the original dense path receives exactly what it always did.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .. import functional, ops
from ..errors import GSAConfigError, GSAError
from ..kernels import common
from .hf_sites import SITE_ATTRIBUTE, GSASite

logger = logging.getLogger(__name__)

# Original implementations whose masks the sparse path understands (4D bool or additive).
SUPPORTED_ORIGINALS = ("sdpa", "eager")

# Keyword arguments that change attention semantics in ways the sparse path does not implement.
DENSE_ONLY_KWARGS = ("sliding_window", "s_aux", "sinks", "position_bias", "head_mask")

_LOGGED: set = set()


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
    if site.policy != "reuse":
        site.last_blocks = None
    codes, norms = site.take_codes()
    mask = _decode_mask(attention_mask, query, key)
    reason = _dense_reason(site, module, query, key, attention_mask, mask, dropout, kwargs)
    if reason is None and site.policy == "sparse" and codes is None:
        reason = "no codes: the cache is not one GSA can extend (see the log) or no cache was passed"
    reuse_blocks = None
    if reason is None and site.policy == "reuse":
        reuse_blocks = _reusable_blocks(site, key)
        if reuse_blocks is None:
            reason = f"layer {site.source().layer} whose selection this layer reuses ran dense in this step"
    if reason is not None:
        _count_dense(site, reason, query, key, value)
        return site.dense_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    options = site.attention_kwargs(query.device.type)
    softcap = kwargs.get("softcap")
    if reuse_blocks is None:
        out, blocks = functional.gsa_attention(
            query, key, value, site.hash_weight, key_codes=codes, key_norms=norms, attn_mask=mask,
            scale=scaling, softcap=softcap, return_blocks=True, **options,
        )
        site.last_blocks = blocks
    else:
        blocks = reuse_blocks[..., : _budget(key.shape[2], options)]
        valid, bias = common.split_decode_mask(mask, query.shape[0], query.shape[1], key.shape[2])
        out = ops.sparse_attention(query, key, value, blocks, valid, bias, options["chunk_size"], scaling, softcap)
    _count_sparse(site, blocks, key, value, codes, options["chunk_size"])
    return out.transpose(1, 2).contiguous(), None


def _decode_mask(attention_mask, query, key) -> Optional[torch.Tensor]:
    """The mask row of a single-query call as [B, 1 or Hq, 1, L] (a tensor mask only)."""
    if not isinstance(attention_mask, torch.Tensor) or query.shape[2] != 1:
        return None
    return common.mask_to_4d(attention_mask)[..., -1:, : key.shape[2]]


def _dense_reason(site, module, query, key, attention_mask, mask, dropout, kwargs) -> Optional[str]:
    if site.policy == "dense":
        return "dense layer"
    if query.shape[2] != 1:
        return "prefill"
    if module.training and dropout:
        return "training with attention dropout"
    if kwargs.get("output_attentions"):
        return "attention weights requested"
    for name in DENSE_ONLY_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} is not implemented by the sparse path"
    if attention_mask is not None and mask is None:
        return f"mask of type {type(attention_mask).__name__} (the sparse path takes tensor masks)"
    options = site.attention_kwargs(query.device.type)
    valid, _ = common.split_decode_mask(mask, query.shape[0], query.shape[1], key.shape[2])
    threshold_reason = ops.dense_reason(
        query, key.shape[2], valid, False, options["seq_len_threshold"], options["concurrency_threshold"]
    )
    return None if threshold_reason is None else ops.DENSE_REASONS[threshold_reason]


def _reusable_blocks(site: GSASite, key: torch.Tensor) -> Optional[torch.Tensor]:
    blocks = site.source().last_blocks
    n_blocks = common.ceil_div(key.shape[2], site.runtime.config.chunk_size)
    if blocks is None or tuple(blocks.shape) != (key.shape[0], key.shape[1], n_blocks):
        return None
    return blocks


def _budget(num_keys: int, options: dict) -> int:
    return common.num_selected_blocks(
        num_keys, options["chunk_size"], top_k_ratio=options["top_k_ratio"],
        budget_tokens=options["budget_tokens"], must_select=options["must_select"],
    )


def _count_dense(site: GSASite, reason: str, query, key, value) -> None:
    stats = site.stats
    stats.dense_calls += 1
    stats.dense_reasons[reason] += 1
    if site.runtime.collect_stats and query.shape[2] == 1:
        stats.dense_kv_bytes += _kv_bytes(key, value, key.shape[2])
    if reason not in ("dense layer", "prefill") and (site.layer, reason) not in _LOGGED:
        _LOGGED.add((site.layer, reason))
        logger.info("GSA layer %d runs dense: %s", site.layer, reason)


def _count_sparse(site: GSASite, blocks, key, value, codes, chunk_size: int) -> None:
    stats = site.stats
    stats.sparse_calls += 1
    if not site.runtime.collect_stats:
        return
    num_keys = key.shape[2]
    starts = blocks.clamp(min=0).to(torch.int64) * chunk_size
    tokens = ((num_keys - starts).clamp(max=chunk_size) * (blocks >= 0)).sum()
    stats.sparse_kv_bytes += int(tokens) * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())
    if codes is not None:
        stats.code_bytes += codes.numel() * codes.element_size()


def _kv_bytes(key, value, num_keys: int) -> int:
    rows = key.shape[0] * key.shape[1]
    return rows * num_keys * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())
