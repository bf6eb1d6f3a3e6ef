"""Pass: settle the GSA config the sites are rewritten with.

No config: derive one from the graph (one layer per site, the keys' head dim, the seed's
default policy). A derived config (GSAConfig.for_model) is re-derived when the model has a
different number of sites. An explicit config must cover every site: a mismatch is an error
naming both numbers."""

from __future__ import annotations

from torch import fx

from ..config import GSAConfig
from ..errors import GSAConfigError
from .context import PassContext


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
    count_differs = context.whole_model and len(context.matches) != config.num_hidden_layers
    if num_layers > config.num_hidden_layers or count_differs:
        if context.config_derived:
            context.config = config.replace(num_hidden_layers=max(num_layers, len(context.matches)))
            return gm
        raise GSAConfigError(
            f"the model has {len(context.matches)} attention sites (layer ids up to {num_layers - 1}, numbered by "
            f"{context.numbering}) but the GSA config {config.model_name!r} has num_hidden_layers="
            f"{config.num_hidden_layers}; use a config made for this model or pass config=None to derive one"
        )
    return gm
