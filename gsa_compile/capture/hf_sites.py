"""GSA sites of a transformers model: one `GSASite` child module per attention module.

A site holds what its attention calls need and nothing the model computes: the layer's policy
(after the model's own constraints, e.g. sliding-window layers stay dense), its hash weight
(a float32 buffer, so `model.to(...)` moves it without rounding it), the original attention
function for the dense path, the codes the cache handed over for this call, the selection it
produced (for layers that reuse it) and counters.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections import Counter
from typing import Callable, Optional

import torch
from torch import nn

from ..config import GSAConfig
from ..errors import GSAConfigError, GSAError
from ..hashing import layer_hash_weight

logger = logging.getLogger(__name__)

SITE_ATTRIBUTE = "gsa_site"


@dataclasses.dataclass
class SiteStats:
    """What a site did since the last reset. Token counts are positions (batch rows and heads
    not multiplied in) except `*_bytes`, which count every row and head."""

    encoded_tokens: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    dense_reasons: Counter = dataclasses.field(default_factory=Counter)
    # Filled only while the runtime collects stats (they cost a device sync per call).
    dense_kv_bytes: int = 0  # K and V bytes a dense decode call reads
    sparse_kv_bytes: int = 0  # K and V bytes of the selected blocks a sparse call reads
    code_bytes: int = 0  # codes a selecting call reads


@dataclasses.dataclass
class SiteShape:
    """How keys look when they reach the attention function (what the hash weight is sized for)."""

    query_heads: int
    kv_heads: int
    key_dim: int


class GSARuntime:
    """State shared by the sites of one optimized model (a plain object, not a module)."""

    def __init__(self, config: GSAConfig, original_implementation: str, implementation: str):
        self.config = config
        self.original_implementation = original_implementation
        self.implementation = implementation
        self.sites: dict[int, GSASite] = {}
        self.enabled = True
        self.collect_stats = False

    def computing_sites(self) -> list["GSASite"]:
        """Sites that select their own blocks, hence keep codes in the cache."""
        return [site for site in self.sites.values() if site.policy == "sparse"]

    def reset_stats(self) -> None:
        for site in self.sites.values():
            site.stats = SiteStats()

    def total_stats(self) -> SiteStats:
        total = SiteStats()
        for site in self.sites.values():
            for field in dataclasses.fields(SiteStats):
                setattr(total, field.name, getattr(total, field.name) + getattr(site.stats, field.name))
        return total


class _SiteRef:
    """How a cache layer points at its site. Copying a cache (generate does for some modes)
    must not copy the model's site, so deepcopy keeps the reference."""

    def __init__(self, site: "GSASite"):
        self.site = site

    def __deepcopy__(self, memo):
        return self


class GSASite(nn.Module):
    def __init__(
        self,
        runtime: GSARuntime,
        layer: int,
        policy: str,
        shape: SiteShape,
        dense_fn: Callable,
        key_builder: Optional[Callable] = None,
        note: str = "",
    ):
        super().__init__()
        self.runtime = runtime
        self.layer = layer
        self.policy = policy
        self.shape = shape
        self.dense_fn = dense_fn
        # MLA caches latents: the keys attention sees are built from them (module.expand_kv).
        self.key_builder = key_builder
        self.note = note
        self.stats = SiteStats()
        self.ref = _SiteRef(self)
        self._codes: Optional[tuple] = None
        self.last_blocks: Optional[torch.Tensor] = None
        self._kwargs_by_device: dict[str, dict] = {}
        weight = None
        if policy == "sparse":
            weight = layer_hash_weight(runtime.config, layer, shape.kv_heads, shape.key_dim).to(torch.float32)
        self.register_buffer("hash_weight", weight, persistent=False)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, policy={self.policy!r}"

    def _apply(self, fn, recurse=True):
        # Hash weights stay float32 whatever dtype the model is cast to: codes must not depend
        # on the model's dtype. Only the device follows.
        if self.hash_weight is not None:
            self.hash_weight = self.hash_weight.to(fn(self.hash_weight).device)
        return self

    # ------------------------------------------------------------------ codes
    def encode(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Codes (and key norms when configured) of keys entering the cache. The cache passes
        what it stores; for MLA that is latents, expanded here into the keys attention sees."""
        from .. import functional

        keys = key_states if self.key_builder is None else self.key_builder(key_states, value_states)[0]
        if tuple(keys.shape[1:2]) + tuple(keys.shape[3:]) != (self.shape.kv_heads, self.shape.key_dim):
            raise GSAError(
                f"layer {self.layer}: keys entering the cache are {tuple(keys.shape)} but the GSA site was "
                f"sized for {self.shape.kv_heads} KV heads of {self.shape.key_dim} dims"
            )
        self.stats.encoded_tokens += keys.shape[2]
        norms = functional.key_norms(keys) if self.runtime.config.key_norm_weighting else None
        return functional.encode(keys, self.hash_weight), norms

    def hand_over(self, codes: torch.Tensor, norms: Optional[torch.Tensor]) -> None:
        """The cache layer gives this call's full codes to the attention call that follows."""
        self._codes = (codes, norms)

    def take_codes(self) -> tuple:
        """(codes, norms) handed over for this call, or (None, None); the site keeps no
        reference to the cache afterwards."""
        handed, self._codes = self._codes or (None, None), None
        return handed

    # ------------------------------------------------------------------ policy
    def attention_kwargs(self, device_type: str) -> dict:
        if device_type not in self._kwargs_by_device:
            self._kwargs_by_device[device_type] = self.runtime.config.attention_kwargs(self.layer, device_type)
        return self._kwargs_by_device[device_type]

    def source(self) -> "GSASite":
        """The site whose selection this one uses."""
        return self.runtime.sites[self.runtime.config.selection_source(self.layer)]


# ---------------------------------------------------------------------- discovery
def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the self-attention modules that call transformers' attention
    interface, in model order."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, GSASite) or not type(module).__name__.endswith("Attention"):
            continue
        if not isinstance(getattr(module, "layer_idx", None), int) or getattr(module, "is_cross_attention", False):
            continue
        found.append((path, module))
    return found


def site_shape(module: nn.Module) -> SiteShape:
    """Heads and key dims of the keys the attention function receives."""
    config = module.config
    query_heads = int(getattr(config, "num_attention_heads"))
    if hasattr(module, "expand_kv"):
        # MLA in transformers expands latents into one key per query head.
        return SiteShape(query_heads, query_heads, int(module.qk_head_dim))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or query_heads)
    key_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
    if key_dim is None:
        key_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
    return SiteShape(query_heads, kv_heads, int(key_dim))


def is_sliding(module: nn.Module) -> bool:
    """Whether the layer attends a sliding window (such layers stay dense: their window already
    bounds what they read, and their cache layers drop old keys)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window is not None
    config = module.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return "sliding" in str(layer_types[module.layer_idx]) or "chunked" in str(layer_types[module.layer_idx])
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def model_eager_function(module: nn.Module) -> Optional[Callable]:
    """The `eager_attention_forward` of the module's modeling file (each model has its own)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def effective_policies(config: GSAConfig, modules: dict[int, nn.Module]) -> dict[int, tuple[str, str]]:
    """layer -> (policy, note): the config's policy, with sliding-window layers kept dense and
    a reuse of a layer that ended up dense turned into a layer computing its own selection."""
    result: dict[int, tuple[str, str]] = {}
    for layer in sorted(modules):
        policy, note = config.layer_policy(layer), ""
        if policy != "dense" and is_sliding(modules[layer]):
            policy, note = "dense", "sliding-window layer: kept dense"
        elif policy == "reuse":
            source = config.selection_source(layer)
            if result.get(source, ("dense", ""))[0] != "sparse":
                policy, note = "sparse", f"layer {source} it would reuse is dense here: computes its own selection"
        result[layer] = (policy, note)
    return result


def check_layers(config: GSAConfig, modules: dict[int, nn.Module], model_name: str) -> None:
    layers = sorted(modules)
    if layers != list(range(len(layers))):
        raise GSAError(f"{model_name}: attention layer indices {layers} are not 0..{len(layers) - 1}")
    if config.num_hidden_layers != len(layers):
        raise GSAConfigError(
            f"the GSA config has num_hidden_layers={config.num_hidden_layers} but {model_name} has "
            f"{len(layers)} attention layers; use a config made for this model "
            f"(GSAConfig.for_model(model)) or one with {len(layers)} layers"
        )
