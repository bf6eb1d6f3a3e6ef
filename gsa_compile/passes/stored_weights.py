"""Hash weights of torch.compile graphs: gsa::stored_hash_weight.

A graph dynamo captured cannot gain inputs, and AOT autograd (aot_eager, Inductor) lifts only
the buffers dynamo traced from the model, so a weight cannot simply be attached to the graph
module. Instead the pass keeps each site's weight in the graph's CodesState and the graph calls
this op, which returns a copy on the device of its anchor tensor (a copy, because a compiler may
reuse an op's output memory once the graph is done with it). torch.export programs hold the
weights as buffers instead (insert_codes_state)."""

from __future__ import annotations

import torch
from torch import Tensor

from .codes_state import state_for


def _weight(state_id: str, site: int) -> Tensor:
    weights = state_for(state_id).hash_weights
    if site not in weights:
        raise KeyError(f"no GSA hash weight for site {site} in codes state {state_id}: the graph outlived the "
                       f"model it was compiled for, or was loaded in another process; compile the model again")
    return weights[site]


@torch.library.custom_op("gsa::stored_hash_weight", mutates_args=())
def stored_hash_weight(anchor: Tensor, state_id: str, site: int) -> Tensor:
    """The hash weight of `site`, on anchor's device."""
    return _weight(state_id, site).to(anchor.device, copy=True)


@stored_hash_weight.register_fake
def _stored_hash_weight_fake(anchor, state_id, site):
    weight = _weight(state_id, site)
    return anchor.new_empty(weight.shape, dtype=weight.dtype)
