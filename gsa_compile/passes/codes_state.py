"""Codes state of rewritten graphs (DESIGN section 4): each key is encoded once.

A rewritten graph owns one CodesState (its id is baked into the graph as a string). Two ops
keep it beside the KV cache the graph updates:
- gsa::cached_codes_cat: the cache grows by torch.cat([past, new], dim=2). The state holds the
  codes of `past` from the previous call; only `new` is encoded. The stored codes are trusted
  only if they have past's batch, heads and length and the code of past's last key equals the
  stored last code (one key encoded per call); otherwise (a new sequence, a reordered beam)
  past is encoded once and the event is counted and logged.
- gsa::cached_codes_index_copy: a static cache updated by index_copy(2, index, new). The state
  mirrors the cache's shape and receives the same index_copy with the codes of `new`; the
  whole cache is encoded only the first time (or when the cache's shape changes).
`what` selects the per-key quantity: "codes" (gsa::encode with the layer's hash weight) or
"norms" (key L2 norms, for key-norm weighted scores).
The ops keep the state in Python, outside the tensors the compiler sees, so the graph's
inputs and guards do not change from one decode step to the next (no recompilation)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import functional, ops

logger = logging.getLogger(__name__)

PER_KEY_QUANTITIES = ("codes", "norms")


# id -> state, for the ops. Compiled graphs do not reliably keep Python objects alive (Inductor
# returns its own callables), so states stay registered until released: optimize releases its
# model's state when the model is freed; release() does it by hand.
_STATES: dict = {}


@dataclass(eq=False)
class CodesState:
    """Per-site codes (and key norms) of the keys a rewritten graph has cached, and the sites'
    hash weights for graphs that read them through gsa::stored_hash_weight."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    entries: dict = field(default_factory=dict)  # (site, "codes" | "norms") -> tensor
    hash_weights: dict = field(default_factory=dict)  # site -> float32 [Hkv, D, R]
    keys_encoded: int = 0  # keys (rows x heads x positions) encoded so far, for tests and logs
    full_reencodes: int = 0  # times stored codes could not be trusted and a cache was encoded whole

    def __post_init__(self):
        _STATES[self.id] = self  # the ops find their state by the id baked into the graph

    def reset(self) -> None:
        """Forget every stored code; the next call encodes its caches whole once."""
        self.entries.clear()

    def release(self) -> None:
        """Drop this state (codes and hash weights): graphs that use it must not run again."""
        self.entries.clear()
        _STATES.pop(self.id, None)


def state_for(state_id: str) -> CodesState:
    """The state with this id; a graph loaded in another process starts with an empty one."""
    return _STATES[state_id] if state_id in _STATES else CodesState(id=state_id)


def _per_key(keys: Tensor, weight: Tensor, what: str) -> Tensor:
    if what == "codes":
        return ops.encode(keys, weight)
    return functional.key_norms(keys)


def _check_what(what: str) -> None:
    if what not in PER_KEY_QUANTITIES:
        raise ValueError(f"what must be one of {list(PER_KEY_QUANTITIES)}, got {what!r}")


def _per_key_shape(keys: Tensor, weight: Tensor, what: str, length) -> tuple:
    if what == "codes":
        return (keys.shape[0], keys.shape[1], length, weight.shape[-1] // 8)
    return (keys.shape[0], keys.shape[1], length)


def _per_key_dtype(what: str) -> torch.dtype:
    return torch.uint8 if what == "codes" else torch.float32


@torch.library.custom_op("gsa::cached_codes_cat", mutates_args=())
def cached_codes_cat(past: Tensor, new: Tensor, weight: Tensor, state_id: str, site: int, what: str) -> Tensor:
    """Codes (or norms) of cat([past, new], dim=2), encoding only `new` when the state holds past's."""
    _check_what(what)
    state = state_for(state_id)
    fresh = _per_key(new, weight, what)
    state.keys_encoded += new.shape[0] * new.shape[1] * new.shape[2]
    past_len = past.shape[2] if past.dim() == 4 else 0
    if past_len == 0:
        result = fresh
    else:
        stored = state.entries.get((site, what))
        if not _stored_matches(stored, past, weight, what):
            logger.info("GSA site %d: stored %s do not match the past keys (new sequence or reordered cache); "
                        "encoding %d past keys once", site, what, past_len)
            state.full_reencodes += 1
            state.keys_encoded += past.shape[0] * past.shape[1] * past_len
            stored = _per_key(past, weight, what)
        result = torch.cat([stored, fresh], dim=2)
    state.entries[(site, what)] = result
    return result


def _stored_matches(stored, past: Tensor, weight: Tensor, what: str) -> bool:
    if stored is None or tuple(stored.shape[:3]) != tuple(past.shape[:3]) or stored.device != past.device:
        return False
    return torch.equal(stored[:, :, -1:], _per_key(past[:, :, -1:], weight, what))


@cached_codes_cat.register_fake
def _cached_codes_cat_fake(past, new, weight, state_id, site, what):
    past_len = past.shape[2] if past.dim() == 4 else 0
    return new.new_empty(_per_key_shape(new, weight, what, past_len + new.shape[2]), dtype=_per_key_dtype(what))


@torch.library.custom_op("gsa::cached_codes_index_copy", mutates_args=())
def cached_codes_index_copy(
    cache: Tensor, index: Tensor, new: Tensor, weight: Tensor, state_id: str, site: int, what: str
) -> Tensor:
    """Codes (or norms) of a static cache after cache.index_copy_(2, index, new)."""
    _check_what(what)
    state = state_for(state_id)
    stored = state.entries.get((site, what))
    if stored is None or tuple(stored.shape[:3]) != tuple(cache.shape[:3]) or stored.device != cache.device:
        stored = _per_key(cache, weight, what)
        state.keys_encoded += cache.shape[0] * cache.shape[1] * cache.shape[2]
    else:
        stored.index_copy_(2, index, _per_key(new, weight, what))
        state.keys_encoded += new.shape[0] * new.shape[1] * new.shape[2]
    state.entries[(site, what)] = stored
    # A copy: the caller may hold the result while the next step updates the state in place.
    return stored.clone()


@cached_codes_index_copy.register_fake
def _cached_codes_index_copy_fake(cache, index, new, weight, state_id, site, what):
    return cache.new_empty(_per_key_shape(cache, weight, what, cache.shape[2]), dtype=_per_key_dtype(what))
