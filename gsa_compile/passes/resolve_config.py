"""Pass: settle the GSA config the sites are rewritten with.

No config: derive one from the graph (one layer per site, the keys' head dim, the default
policy: first two and last three layers dense). A derived config (GSAConfig.for_model) is re-derived when the graph numbers
layers beyond it. An explicit config must match the graph: its num_hidden_layers must be one
past the highest layer id of a graph that holds the whole model (torch.export, or a dynamo
graph that did not end at a graph break) and may not be below it in a piece of one; a
mismatch is a GSAConfigError naming both numbers, on every route."""

from __future__ import annotations

from torch import fx

from ..config import GSAConfig
from ..errors import GSAConfigError
from .context import PassContext
from .fx_utils import captured_whole_forward


def resolve_config(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    if not context.matches:
        return gm
    num_layers = max(match.layer for match in context.matches) + 1
    if context.config is None:
        head_dim = context.matches[0].key_geometry()[1]
        context.config = GSAConfig(
            model_name=gm.__class__.__name__, num_hidden_layers=num_layers, head_dim=head_dim,
            hash_bits=max(8, 8 * -(-head_dim // 8)),
        )
        context.config_derived = True
        return gm
    config = context.config
    if num_layers > config.num_hidden_layers and context.config_derived:
        context.config = config.replace(num_hidden_layers=num_layers)
        return gm
    whole = context.whole_model or captured_whole_forward()
    if num_layers > config.num_hidden_layers or (whole and not context.config_derived
                                                  and num_layers != config.num_hidden_layers):
        piece = "" if whole else " in this piece of the model (a graph break splits it)"
        # A whole call of a submodule (a layer compiled on its own after a graph break in the
        # model's forward) looks whole here too: the message names both causes.
        split = ("" if not whole or num_layers > config.num_hidden_layers else
                 "; if the model's forward has a graph break, each layer may compile on its own "
                 "(torch.compile(..., fullgraph=True) shows where it breaks)")
        raise GSAConfigError(
            f"the model has {len(context.matches)} attention sites{piece} (layer ids up to {num_layers - 1}, "
            f"numbered by {context.numbering}, so {num_layers} layers) but the GSA config {config.model_name!r} has "
            f"num_hidden_layers={config.num_hidden_layers}{split}; use a config made for this model "
            f"(GSAConfig.for_model(model, *example_inputs) sizes one from the graph) or pass config=None to derive one"
        )
    return gm
