"""Codes state for transformers caches (docs/compiler.md, "Codes state").

A layer of a GSA-selecting attention keeps the hash codes of its keys next to its keys and
values. Rather than re-implementing every cache layer, the codes live in a second layer of the
same transformers class (`DynamicLayer` or `StaticLayer`) that stores codes as its "keys" and
key norms (or nothing) as its "values", and every operation on the layer (update, crop, beam
reorder, batch repeat/select, reset, offload) is mirrored onto it. So the codes grow, move and
shrink exactly like the keys do, in both transformers versions we support, and each key is
encoded once: when it enters the cache.

`attach_codes(cache, runtime)` converts a cache's layers in place (it is idempotent); the
optimized model runs it on the cache of every forward call, which covers generate()'s own
cache, caches users pass in and caches built by an earlier forward.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from transformers import cache_utils
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer

from .hf_sites import GSARuntime, GSASite

logger = logging.getLogger(__name__)

# Operations whose effect on keys must also apply to codes; they all take the same arguments.
MIRRORED_OPERATIONS = (
    "crop", "reorder_cache", "batch_repeat_interleave", "batch_select_indices", "reset", "offload", "prefetch",
)


class CodesMixin(CacheLayerMixin):
    """Cache layer that also stores the hash codes of its keys (see the module docstring).

    It derives from CacheLayerMixin so that a plain layer can become a codes layer in place
    (__class__ assignment needs the same instance layout)."""

    def attach_site(self, site: GSASite) -> None:
        base = next(cls for cls in type(self).__mro__ if cls in PLAIN_LAYERS)
        self._gsa_ref = site.ref
        self._gsa_codes = PLAIN_LAYERS[base](self)
        stored = self.get_seq_length() if self.is_initialized else 0
        if int(stored) > 0:
            # A cache filled before it reached GSA: its keys enter the codes state now, once.
            keys, values = self.keys[:, :, : int(stored)], self.values[:, :, : int(stored)]
            self._store_codes(*site.encode(keys, values))

    @property
    def gsa_site(self) -> GSASite:
        return self._gsa_ref.site

    @property
    def codes(self) -> Optional[torch.Tensor]:
        """uint8 [B, Hkv, L, R / 8], aligned with `keys` (None before the first update)."""
        return self._gsa_codes.keys

    @property
    def key_norms(self) -> Optional[torch.Tensor]:
        """float32 [B, Hkv, L] when the config weights scores by key norms, else None."""
        stored = self._gsa_codes.values
        return None if stored is None or stored.shape[-1] == 0 else _bytes_to_norms(stored)

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self._store_codes(*self.gsa_site.encode(key_states, value_states), *args, **kwargs)
        return keys, values

    def _store_codes(self, codes, norms, *args, **kwargs):
        # Norms ride as the codes layer's "values", as the 4 bytes of each float32 (some
        # transformers versions give a static layer's values the dtype of its keys); without
        # norms a zero-width tensor keeps the layer's shape bookkeeping intact at no cost.
        payload = codes.new_empty((*codes.shape[:3], 0)) if norms is None else _norms_to_bytes(norms)
        all_codes, all_payload = self._gsa_codes.update(codes, payload, *args, **kwargs)
        return all_codes, (None if norms is None else _bytes_to_norms(all_payload))


def _norms_to_bytes(norms: torch.Tensor) -> torch.Tensor:
    return norms.to(torch.float32).unsqueeze(-1).contiguous().view(torch.uint8)


def _bytes_to_norms(stored: torch.Tensor) -> torch.Tensor:
    return stored.contiguous().view(torch.float32)[..., 0]


def _mirrored(name: str):
    def operation(self, *args, **kwargs):
        result = getattr(super(CodesMixin, self), name)(*args, **kwargs)
        getattr(self._gsa_codes, name)(*args, **kwargs)
        return result

    operation.__name__ = name
    operation.__doc__ = f"{name} on the keys and values, then the same on the codes."
    return operation


for _name in MIRRORED_OPERATIONS:
    setattr(CodesMixin, _name, _mirrored(_name))


class CodesDynamicLayer(CodesMixin, DynamicLayer):
    pass


class CodesStaticLayer(CodesMixin, StaticLayer):
    pass


# Plain layer class -> how to build an empty twin of a layer of it (the codes store).
PLAIN_LAYERS = {
    DynamicLayer: lambda layer: DynamicLayer(),
    StaticLayer: lambda layer: StaticLayer(max_cache_len=layer.max_cache_len),
}
CODES_LAYERS = {}
# Layers of hybrids that hold a linear-attention / SSM state beside full-attention keys
# (Falcon-H1 runs both in one layer); their keys get codes like a plain layer's. Most specific
# first: replacing a codes layer looks its plain class up in this order.
for _name in ("LinearAttentionAndFullAttentionLayer", "LinearAttentionAndStaticFullAttentionLayer"):
    _hybrid = getattr(cache_utils, _name, None)  # newer transformers only
    if _hybrid is not None:
        CODES_LAYERS[_hybrid] = type(f"Codes{_name}", (CodesMixin, _hybrid), {})
CODES_LAYERS.update({DynamicLayer: CodesDynamicLayer, StaticLayer: CodesStaticLayer})


def attach_codes(cache: Cache, runtime: GSARuntime) -> None:
    """Give every GSA-selecting layer of `cache` a codes store (in place; idempotent)."""
    cache = getattr(cache, "self_attention_cache", cache)
    layers = cache.layers
    sites = runtime.computing_sites()
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate is not None and sites:
        # A cache that creates layers lazily on update: create them now so they can hold codes.
        while len(layers) <= sites[-1].layer:
            layers.append(replicate())
    for site in sites:
        if site.layer >= len(layers):
            continue
        layer = layers[site.layer]
        if isinstance(layer, CodesMixin):
            if layer.gsa_site is site:
                continue
            # Codes made with another config's hash weights: start the codes state over.
            layer.__class__ = next(base for base in CODES_LAYERS if isinstance(layer, base))
        codes_class = CODES_LAYERS.get(type(layer))
        if codes_class is None:
            _log_unsupported(site, layer)
            continue
        layer.__class__ = codes_class
        layer.attach_site(site)


_UNSUPPORTED_LOGGED: set = set()


def _log_unsupported(site: GSASite, layer) -> None:
    key = (site.layer, type(layer).__name__)
    if key not in _UNSUPPORTED_LOGGED:
        _UNSUPPORTED_LOGGED.add(key)
        logger.warning(
            "layer %d: cache layer %s cannot hold GSA codes (supported: %s); this layer decodes dense",
            site.layer, type(layer).__name__, sorted(cls.__name__ for cls in CODES_LAYERS),
        )
