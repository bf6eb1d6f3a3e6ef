"""Hash weights of torch.compile graphs: gsa::stored_hash_weight.

A graph dynamo captured cannot gain inputs, and AOT autograd (aot_eager, Inductor) lifts only
the buffers dynamo traced from the model, so a weight cannot simply be attached to the graph
module. Instead the pass stores each layer's weight here and the graph calls this op, which
returns a copy on the device of its anchor tensor (a copy, because a compiler may reuse an op's
output memory once the graph is done with it). torch.export programs hold the weights as
constants instead (insert_codes_state)."""

from __future__ import annotations

import torch
from torch import Tensor

_WEIGHTS: dict = {}


def store(key: str, weight: Tensor) -> None:
    _WEIGHTS[key] = weight


def stored(key: str) -> Tensor:
    """The weight stored under `key` ("<codes state id>:<layer>")."""
    return _WEIGHTS[key]


@torch.library.custom_op("gsa::stored_hash_weight", mutates_args=())
def stored_hash_weight(anchor: Tensor, key: str) -> Tensor:
    """The hash weight stored under `key`, on anchor's device."""
    if key not in _WEIGHTS:
        raise KeyError(f"no GSA hash weight stored under {key!r}: the graph was rewritten in another process; "
                       f"compile the model again here")
    return _WEIGHTS[key].to(anchor.device, copy=True)


@stored_hash_weight.register_fake
def _stored_hash_weight_fake(anchor, key):
    return anchor.new_empty(_WEIGHTS[key].shape, dtype=_WEIGHTS[key].dtype)
