"""Run a transformers model with a probe in place of its attention function.

Calibration, the layer profiler and the accuracy benchmark all need what attention sees:
post-RoPE queries and the cached keys of each layer, per call. transformers routes every
attention call through its AttentionInterface, so one registered function reaches every layer
without touching the model's code. The probe receives the call and returns the attention
output; `dense_attention` is the model's own SDPA path.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import GSAError

PROBE_IMPLEMENTATION = "gsa_probe"
PROBE_ATTRIBUTE = "gsa_probe"


class AttentionProbe(Protocol):
    def __call__(self, layer: int, module: nn.Module, query, key, value, attention_mask, scaling, **kwargs):
        """query [B, Hq, T, D] (post-RoPE), key/value [B, Hkv, L, D] (the whole cache) -> the
        attention output [B, T, Hq, Dv] as transformers' attention functions return it."""


def dense_attention(module, query, key, value, attention_mask, scaling, **kwargs) -> torch.Tensor:
    """The model's own SDPA attention (what every rule's prefill and the dense rule run)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)[0]


def _probe_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    probe: Callable = getattr(module, PROBE_ATTRIBUTE, None)
    if probe is None:
        raise GSAError(
            f"{type(module).__name__} runs the {PROBE_IMPLEMENTATION!r} attention implementation outside "
            f"gsa_compile.calibration.probe.attention_probe()"
        )
    return probe(module.layer_idx, module, query, key, value, attention_mask, scaling, **kwargs), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PROBE_IMPLEMENTATION, _probe_forward)
    # The probe's dense path is SDPA, so it takes SDPA's masks.
    AttentionMaskInterface.register(PROBE_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> self-attention module of a transformers model."""
    from ..capture.hf_sites import attention_modules

    layers = {module.layer_idx: module for _, module in attention_modules(model)}
    if not layers:
        raise GSAError(f"{type(model).__name__} has no attention module that calls transformers' AttentionInterface")
    return layers


@contextlib.contextmanager
def attention_probe(model: nn.Module, probe: AttentionProbe):
    """Within the block every attention call of `model` goes to `probe`."""
    if getattr(model, "gsa_runtime", None) is not None:
        raise GSAError("the model is already optimized by gsa_compile; probe the original model")
    _register()
    layers = attention_layers(model)
    original = model.config._attn_implementation
    for module in layers.values():
        setattr(module, PROBE_ATTRIBUTE, probe)
    model.set_attn_implementation(PROBE_IMPLEMENTATION)
    try:
        yield layers
    finally:
        model.set_attn_implementation(original)
        for module in layers.values():
            delattr(module, PROBE_ATTRIBUTE)


def forward_tokens(model: nn.Module, tokens: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits of the last position after feeding `tokens` [B, T] (into `cache` when given)."""
    from ..capture.hf import cache_argument

    kwargs = {} if cache is None else {cache_argument(model): cache}
    return model(tokens, use_cache=cache is not None, logits_to_keep=1, **kwargs).logits[:, -1]
