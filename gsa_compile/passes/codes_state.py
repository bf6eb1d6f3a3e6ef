"""Codes state of rewritten graphs: each key is encoded once.

A CodesState belongs to one rewritten model (the compile options, the exported program, the
handle optimize attaches); nothing outside it refers to it. It keeps two kinds of per-site
(codes or key norms) entries:

- Static caches (cache.index_copy_(2, index, new), slice assignment into a fixed buffer): a
  buffer of the cache's shape, encoded whole from the cache's contents when the first graph that
  updates the cache is built, and carried by the cache tensor itself (static_codes_of), so every
  graph that updates that cache, whichever compile made it, finds the same buffer. Each graph
  holds it as a graph-module buffer (torch.compile graphs: AOT autograd lifts it as a static
  input of fixed address; exported programs: a mutated buffer) and writes the codes of `new`
  into it in place, in the graph (store_static_codes). No Python runs at a step, so the update
  replays inside a CUDA graph, and the decode graph does not change between steps.
- Growing caches (torch.cat([past, new], dim=2)): the cache has a new shape every step, so no
  graph replays it. gsa::cached_codes_cat keeps the codes of `past` from the previous call in the
  state the running graph activated (CodesState.active: the compiled callable of a torch.compile
  graph does it; an exported program runs inside `with state.active():`) and encodes only `new`.
  The stored codes are trusted when they have past's batch, heads and length and past is the
  key tensor the graph returned last time, unmodified (the compiled callable checks this on the
  host, from the tensors' identity and version counters); when that cannot be told (past is not
  a graph input, the cat result not an output, an exported program) the code of past's last key
  is compared with the stored last code (a device read). Otherwise (a new sequence, a reordered
  beam) past is encoded once and the event is counted and logged. Outside an active state of
  its own the op encodes past whole (exact, not once per key).
`what` selects the per-key quantity: "codes" (gsa::encode with the layer's hash weight) or
"norms" (key L2 norms, for key-norm weighted scores)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor

from .. import functional, ops

logger = logging.getLogger(__name__)

PER_KEY_QUANTITIES = ("codes", "norms")

# The attribute of a static cache tensor that holds its StaticCodes.
_CACHE_ATTRIBUTE = "_gsa_static_codes"
# The state of the graph running now (set by CodesState.active for the length of one call).
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("gsa_codes_state", default=None)


@dataclass(eq=False)
class StaticCodes:
    """The codes (or norms) buffer of one site's static cache."""

    cache: Tensor  # the cache tensor the buffer mirrors
    weight: Tensor
    what: str
    buffer: Tensor


@dataclass(eq=False)
class CodesState:
    """Per-site codes (and key norms) of the keys a rewritten model has cached, and the sites'
    hash weights (the tensors its graphs hold as buffers)."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    growing: dict = field(default_factory=dict)  # (site, what) -> codes of the last cat result
    returned_keys: dict = field(default_factory=dict)  # site -> (weakref to the last cat result, its version)
    static: dict = field(default_factory=dict)  # (site, what) -> StaticCodes
    hash_weights: dict = field(default_factory=dict)  # site -> float32 [Hkv, D, R]
    counters: dict = field(default_factory=dict)  # device -> int64 scalar: keys encoded by static updates
    host_keys_encoded: int = 0  # keys encoded by gsa::cached_codes_cat
    full_reencodes: int = 0  # times stored codes could not be trusted and a cache was encoded whole

    def codes(self, site: int, what: str = "codes") -> Tensor:
        """The stored codes (or norms) of a site's cache."""
        if (site, what) in self.static:
            return self.static[(site, what)].buffer
        return self.growing[(site, what)]

    @property
    def keys_encoded(self) -> int:
        """Keys (rows x heads x positions) encoded so far; reads the device counters."""
        return self.host_keys_encoded + sum(int(counter) for counter in self.counters.values())

    def counter(self, device: torch.device) -> Tensor:
        """The device counter static codes updates add to (shared by every graph)."""
        device = torch.device(device)
        if device not in self.counters:
            self.counters[device] = torch.zeros((), dtype=torch.int64, device=device)
        return self.counters[device]

    def static_buffer(self, site: int, what: str, cache: Tensor, weight: Tensor) -> Tensor:
        """The codes buffer mirroring `cache` with `weight`: the one the cache already carries
        (other graphs of the model write it, whichever state built them), or a new one encoded
        from the cache's contents."""
        entry = next((e for e in static_codes_of(cache) if e.what == what and e.weight.shape == weight.shape
                      and e.weight.device == weight.device and torch.equal(e.weight, weight)), None)
        if entry is None:
            with torch.no_grad():
                entry = StaticCodes(cache, weight, what, per_key(cache, weight, what))
            if what == "codes":
                self.host_keys_encoded += keys_in(cache)
            # The codes live with the cache they mirror and go when it goes.
            cache.__dict__.setdefault(_CACHE_ATTRIBUTE, []).append(entry)
        self.static[(site, what)] = entry
        return entry.buffer

    def refresh(self) -> None:
        """Encode every static cache whole again (after it was written outside the rewritten
        graphs) and forget the stored codes of growing caches."""
        self.growing.clear()
        self.returned_keys.clear()
        with torch.no_grad():
            for entry in self.static.values():
                entry.buffer.copy_(per_key(entry.cache, entry.weight, entry.what))

    def release(self) -> None:
        """Drop every stored code, codes buffer and hash weight this state holds (graphs built
        on them must not run again)."""
        self.growing.clear()
        self.returned_keys.clear()
        for entry in self.static.values():
            owned = static_codes_of(entry.cache)
            if entry in owned:
                owned.remove(entry)
        self.static.clear()
        self.hash_weights.clear()

    @contextlib.contextmanager
    def active(self, known_pasts: Optional[dict] = None) -> Iterator["CodesState"]:
        """Make gsa::cached_codes_cat of this state's graphs read and store codes here for the
        calls inside the block. known_pasts: site -> whether the call's past keys are the keys
        the site's stored codes were made for (the caller checked on the host: the tensor this
        state's last call returned, unmodified since); sites not in it compare one code."""
        token = _ACTIVE.set(_Call(self, known_pasts or {}))
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


@dataclass(eq=False)
class _Call:
    """What one call of a graph with growing caches brings to its gsa::cached_codes_cat ops."""

    state: CodesState
    known_pasts: dict


def static_codes_of(cache: Tensor) -> list:
    """The StaticCodes buffers that mirror `cache` (one per hash weight and quantity)."""
    return cache.__dict__.get(_CACHE_ATTRIBUTE, [])


def keys_in(keys: Tensor) -> int:
    return keys.shape[0] * keys.shape[1] * keys.shape[2]


def per_key(keys: Tensor, weight: Tensor, what: str) -> Tensor:
    if what not in PER_KEY_QUANTITIES:
        raise ValueError(f"what must be one of {list(PER_KEY_QUANTITIES)}, got {what!r}")
    if what == "codes":
        return ops.encode(keys, weight)
    return functional.key_norms(keys)


def store_static_codes(buffer: Tensor, index: Tensor, new: Tensor, weight: Tensor, counter: Optional[Tensor],
                       what: str) -> Tensor:
    """What a graph runs beside cache.index_copy_(2, index, new): the same update of the site's
    codes buffer with the codes of `new`, counted on the device. Plain torch, traced into the
    graph; returns the buffer (read by the site in the same call)."""
    buffer.index_copy_(2, index, per_key(new, weight, what))
    if counter is not None:
        counter.add_(keys_in(new))
    return buffer


def _per_key_shape(keys: Tensor, weight: Tensor, what: str, length) -> tuple:
    if what == "codes":
        return (keys.shape[0], keys.shape[1], length, weight.shape[-1] // 8)
    return (keys.shape[0], keys.shape[1], length)


def _per_key_dtype(what: str) -> torch.dtype:
    return torch.uint8 if what == "codes" else torch.float32


# cudagraph_unsafe: the op reads and writes Python state, which a CUDA graph replay would skip.
@torch.library.custom_op("gsa::cached_codes_cat", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def cached_codes_cat(past: Tensor, new: Tensor, weight: Tensor, state_id: str, site: int, what: str) -> Tensor:
    """Codes (or norms) of cat([past, new], dim=2), encoding only `new` when the active state
    (the one with id state_id) holds past's."""
    fresh = per_key(new, weight, what)
    call = _ACTIVE.get()
    state = call.state if call is not None and call.state.id == state_id else None
    counted = keys_in(new)
    past_len = past.shape[2] if past.dim() == 4 else 0
    if past_len == 0:
        result = fresh
    else:
        stored = None if state is None else state.growing.get((site, what))
        if stored is None or tuple(stored.shape[:3]) != tuple(past.shape[:3]) or stored.device != past.device:
            trusted = False
        elif site in call.known_pasts:
            trusted = call.known_pasts[site]
        else:
            trusted = _codes_match(stored, past, weight, what)
        if not trusted:
            if state is not None:
                logger.info("GSA site %d: stored %s do not match the past keys (new sequence or reordered cache); "
                            "encoding %d past keys once", site, what, past_len)
                if what == "codes":
                    state.full_reencodes += 1
            counted += keys_in(past)
            stored = per_key(past, weight, what)
        result = torch.cat([stored, fresh], dim=2)
    if state is not None:
        state.growing[(site, what)] = result
        if what == "codes":
            state.host_keys_encoded += counted
    return result


def _codes_match(stored: Tensor, past: Tensor, weight: Tensor, what: str) -> bool:
    """Whether the stored codes' last entry is the code of past's last key (reads the device)."""
    return torch.equal(stored[:, :, -1:], per_key(past[:, :, -1:], weight, what))


@cached_codes_cat.register_fake
def _cached_codes_cat_fake(past, new, weight, state_id, site, what):
    past_len = past.shape[2] if past.dim() == 4 else 0
    return new.new_empty(_per_key_shape(new, weight, what, past_len + new.shape[2]), dtype=_per_key_dtype(what))
