"""GSA sites of a transformers model: one `GSASite` child module per attention module.

A site holds what its attention calls need and nothing the model computes: the layer's policy
(after the model's own constraints, e.g. sliding-window layers stay dense), its hash weight
(a float32 buffer, so `model.to(...)` moves it without rounding it), the original attention
function for the dense path and counters. Nothing of a single call lives on it.
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
from ..decode import DENSE_REASONS
from ..errors import GSAConfigError, GSAError
from ..hashing import layer_hash_weight

logger = logging.getLogger(__name__)

SITE_ATTRIBUTE = "gsa_site"


# What a site counts, in the order of its counters.
COUNTED = ("encoded_tokens", "sparse_calls", "dense_calls", "dense_kv_bytes", "sparse_kv_bytes", "code_bytes")
REASON_SLOTS = {reason: len(COUNTED) + i for i, reason in enumerate(DENSE_REASONS)}


@dataclasses.dataclass
class SiteStats:
    """What a site did since the last reset. Token counts are positions (batch rows and heads
    not multiplied in) except `*_bytes`, which count every row and head. dense_reasons maps a
    gsa_compile.decode.DENSE_REASONS key to its count."""

    encoded_tokens: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    # Filled only while the runtime collects stats.
    dense_kv_bytes: int = 0  # K and V bytes a dense decode call reads
    sparse_kv_bytes: int = 0  # K and V bytes of the selected blocks a sparse call reads
    code_bytes: int = 0  # codes a selecting call reads
    dense_reasons: Counter = dataclasses.field(default_factory=Counter)

    @classmethod
    def from_counts(cls, counts: list) -> "SiteStats":
        stats = cls(**dict(zip(COUNTED, counts)))
        stats.dense_reasons = Counter({reason: counts[slot] for reason, slot in REASON_SLOTS.items() if counts[slot]})
        return stats


@dataclasses.dataclass
class SiteShape:
    """How keys look when they reach the attention function (what the hash weight is sized for)."""

    query_heads: int
    kv_heads: int
    key_dim: int


class GSARuntime:
    """What the sites of one optimized model share (a plain object, not a module): the config,
    read at every call (a changed config applies to the next call), and the sites."""

    def __init__(self, config: GSAConfig, original_implementation: str, implementation: str):
        self.config = config
        self.original_implementation = original_implementation
        self.implementation = implementation
        self.sites: dict[int, GSASite] = {}
        self.enabled = True
        self.collect_stats = False
        # Whether the model's forward passes keyword arguments down (set by optimize_transformers).
        self.forward_takes_kwargs = True

    def computing_sites(self) -> list["GSASite"]:
        """Sites that select their own blocks, hence keep codes in the cache."""
        return [site for site in self.sites.values() if site.policy == "sparse"]

    def reset_stats(self) -> None:
        for site in self.sites.values():
            site.reset_stats()

    def total_stats(self) -> SiteStats:
        total = [0] * (len(COUNTED) + len(REASON_SLOTS))
        for site in self.sites.values():
            total = [a + b for a, b in zip(total, site.counts())]
        return SiteStats.from_counts(total)


class _SiteRef:
    """How a cache layer points at its site. Copying a cache (generate does for some modes)
    must not copy the model's site, so deepcopy keeps the reference."""

    def __init__(self, site: "GSASite"):
        self.site = site

    def __deepcopy__(self, memo):
        # A copy of the whole model copies its sites: the copied cache points at those.
        copied = memo.get(id(self.site))
        return self if copied is None else _SiteRef(copied)


class GSASite(nn.Module):
    """One attention module's GSA site. It holds no per-call state: the codes of a call come
    from the call's cache and a reused selection from the call's DecodeStep (hf_attention), so
    threads and copies of the model never see each other's calls.

    Counters: eager calls decided on the host count in Python; compiled calls and calls decided
    on the device count in an int64 buffer on the device (so CUDA-graph replays count too, and no
    counter is a value dynamo would guard on). `stats` adds both up (reading the device)."""

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
        self.ref = _SiteRef(self)
        self._host_counts = [0] * (len(COUNTED) + len(REASON_SLOTS))
        self.register_buffer("counters", torch.zeros(len(self._host_counts), dtype=torch.int64), persistent=False)
        weight = None
        if policy == "sparse":
            weight = layer_hash_weight(runtime.config, layer, shape.kv_heads, shape.key_dim).to(torch.float32)
        self.register_buffer("hash_weight", weight, persistent=False)
        _mark_static(self.counters)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, policy={self.policy!r}"

    def _apply(self, fn, recurse=True):
        # Hash weights stay float32 whatever dtype the model is cast to: codes must not depend
        # on the model's dtype. Only the device follows (the counters stay int64).
        device = fn(self.counters.to(torch.float32)).device
        if self.hash_weight is not None:
            self.hash_weight = self.hash_weight.to(device)
        if self.counters.device != device:
            self.counters = self.counters.to(device)
            _mark_static(self.counters)
        return self

    # ------------------------------------------------------------------ counting
    def count(self, name: str, amount=1) -> None:
        """Add `amount` (an int, or a tensor computed on the device) to a counter: a COUNTED
        name or a DENSE_REASONS key (which also counts a dense call)."""
        slot = REASON_SLOTS.get(name, None)
        slots = [COUNTED.index("dense_calls"), slot] if slot is not None else [COUNTED.index(name)]
        if isinstance(amount, torch.Tensor) or torch.compiler.is_compiling():
            for index in slots:
                self.counters[index] += amount
        else:
            for index in slots:
                self._host_counts[index] += amount

    def counts(self) -> list:
        return [host + device for host, device in zip(self._host_counts, self.counters.tolist())]

    @property
    def stats(self) -> SiteStats:
        return SiteStats.from_counts(self.counts())

    def reset_stats(self) -> None:
        self._host_counts = [0] * len(self._host_counts)
        self.counters.zero_()

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
        self.count("encoded_tokens", keys.shape[2])
        norms = functional.key_norms(keys) if self.runtime.config.key_norm_weighting else None
        return functional.encode(keys, self.hash_weight), norms

    # ------------------------------------------------------------------ policy
    def attention_kwargs(self, device_type: str) -> dict:
        return self.runtime.config.attention_kwargs(self.layer, device_type)

    def source(self) -> "GSASite":
        """The site whose selection this one uses."""
        return self.runtime.sites[self.runtime.config.selection_source(self.layer)]


def _mark_static(t: torch.Tensor) -> None:
    # CUDA graphs replay counters in place: their address must not change between steps.
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)


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
