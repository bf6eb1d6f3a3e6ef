"""The FX pass pipeline: each pass is `(graph_module, context) -> graph_module`, run in order.

    match_attention      find attention sites (matchers/), list what is left dense and why
    number_layers        layer id per site (module path index, else graph order)
    resolve_config       derive or check the GSA config against the sites
    apply_policy         dense / sparse / reuse per layer; reuse chains as graph edges
    insert_codes_state   hash weights as buffers; codes updates beside the KV cache updates
    rewrite_sites        each sparse/reuse site -> one gsa::attention call
    report_sites         the Report of the rewrite

Every capture route (torch.compile backend, torch.export, inspect) runs this same list."""

from __future__ import annotations

import logging

from torch import fx

from .apply_policy import apply_policy
from .context import PassContext
from .insert_codes_state import insert_codes_state
from .match_attention import match_attention
from .number_layers import number_layers
from .report_sites import report_sites
from .resolve_config import resolve_config
from .rewrite_sites import rewrite_sites

logger = logging.getLogger(__name__)

PIPELINE = [
    match_attention,
    number_layers,
    resolve_config,
    apply_policy,
    insert_codes_state,
    rewrite_sites,
    report_sites,
]

__all__ = ["PIPELINE", "PassContext", "run_pipeline"]


def run_pipeline(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    for gsa_pass in PIPELINE:
        gm = gsa_pass(gm, context)
        logger.debug("GSA pass %s done on %s", gsa_pass.__name__, context.route)
    counts = context.report.counts()
    logger.info("GSA %s: %d sites (%d sparse, %d reuse, %d dense), %d left dense as unmatched", context.route,
                len(context.report.sites), counts["sparse"], counts["reuse"], counts["dense"],
                len(context.report.unmatched))
    return gm
