"""Attention matchers: small rules over FX graphs of both capture levels.

Each rule module exposes `match(node) -> AttentionMatch | NotProvable | None`: a record of a
proven attention site, a candidate it recognised but cannot prove equivalent (it is reported
and left untouched), or None when the node is not its pattern; a rule may also expose
`rewrite(match)`, the graph edits (equal values) its claimed matches need before the site
replaces them. Rules are tried in order on every node; to add one, write a module with `match`
and list it in RULES. A rule that raises on a graph shape it does not expect makes the node a
NotProvable with the error as the reason: no graph fails to compile because of a matcher."""

from __future__ import annotations

import logging

from torch import fx

from . import mha, sdpa, softmax_attention
from .record import AttentionMatch, NotProvable

logger = logging.getLogger(__name__)

RULES = (sdpa, softmax_attention, mha)

__all__ = ["RULES", "AttentionMatch", "NotProvable", "find_attention"]


def find_attention(graph: fx.Graph) -> tuple[list[AttentionMatch], list[NotProvable]]:
    """Every attention site of a graph in graph order, and the candidates left alone."""
    matches, refused = [], []
    claimed: set = set()
    for node in list(graph.nodes):
        if getattr(node, "_erased", False):  # removed by an earlier rule's rewrite
            continue
        for rule in RULES:
            found = _try(rule, node)
            if found is None:
                continue
            if isinstance(found, NotProvable):
                refused.append(found)
            elif not claimed.isdisjoint(found.nodes):
                refused.append(NotProvable(node, f"this attention shares nodes with another site matched earlier "
                                                 f"({found.pattern} over {', '.join(n.name for n in found.nodes)})"))
            else:
                rewritten = _rewrite(rule, found)
                if isinstance(rewritten, NotProvable):
                    refused.append(rewritten)
                else:
                    claimed.update(found.nodes)
                    matches.append(found)
            break
    return matches, refused


def _rewrite(rule, found: AttentionMatch):
    """The rule's graph edits for a claimed match; each edit keeps every value, so one that
    fails leaves a correct graph and the site dense."""
    if not hasattr(rule, "rewrite"):
        return found
    try:
        rule.rewrite(found)
    except Exception as exc:
        name = rule.__name__.rsplit(".", 1)[-1]
        logger.debug("GSA rule %s could not rewrite %s", name, found.output.name, exc_info=True)
        return NotProvable(found.output, f"rule {name} could not prepare this site ({type(exc).__name__}: {exc})")
    return found


def _try(rule, node: fx.Node):
    try:
        return rule.match(node)
    except Exception as exc:  # a rule meeting a graph shape it does not expect: left dense, reported
        name = rule.__name__.rsplit(".", 1)[-1]
        logger.debug("GSA rule %s raised on %s", name, node.name, exc_info=True)
        return NotProvable(node, f"rule {name} could not read this graph shape ({type(exc).__name__}: {exc})")
