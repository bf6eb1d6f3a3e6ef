"""Pass: find every attention site (matchers/) and list the candidates left dense."""

from __future__ import annotations

from torch import fx

from ..report import Unmatched
from .context import PassContext
from .fx_utils import module_path
from .matchers import find_attention


def match_attention(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    matches, refused = find_attention(gm.graph)
    context.matches = matches
    for candidate in refused:
        location = f"{module_path(candidate.node) or '<root>'}:{candidate.node.name}"
        context.report.unmatched.append(Unmatched(location=location, reason=candidate.reason))
    return gm
