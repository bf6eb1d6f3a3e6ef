"""Pass: list every site in the report (layer, pattern, policy, module, GQA groups, codes source)."""

from __future__ import annotations

from torch import fx

from ..report import Site
from .context import PassContext


def report_sites(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    for match in context.matches:
        layer = match.layer
        policy = context.policies.get(layer, "dense")
        notes = [context.notes[layer]] if layer in context.notes else []
        if match.gqa_unwrapped:
            notes.append(f"{match.gqa_unwrapped} unwrapped")
        if layer in context.codes:
            notes.append(f"codes: {context.codes[layer][2]}")
        context.report.sites.append(Site(
            layer=layer,
            pattern=match.pattern,
            policy=policy,
            module_path=match.module_path,
            reuse_of=context.reuse_sources.get(layer),
            gqa_groups=match.gqa_groups,
            note="; ".join(notes),
            head_dim=match.key_geometry()[1],
        ))
    return gm
