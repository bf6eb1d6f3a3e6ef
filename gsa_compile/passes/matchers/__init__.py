"""Attention matchers: small rules over FX graphs of both capture levels.

Each rule module exposes `match(node) -> AttentionMatch | NotProvable | None`: a record of a
proven attention site, a candidate it recognised but cannot prove equivalent (it is reported
and left untouched), or None when the node is not its pattern. Rules are tried in order on
every node; to add one, write a module with `match` and list it in RULES."""

from __future__ import annotations

from torch import fx

from . import mha, sdpa, softmax_attention
from .record import AttentionMatch, NotProvable

RULES = (sdpa, softmax_attention, mha)

__all__ = ["RULES", "AttentionMatch", "NotProvable", "find_attention"]


def find_attention(graph: fx.Graph) -> tuple[list[AttentionMatch], list[NotProvable]]:
    """Every attention site of a graph in graph order, and the candidates left alone."""
    matches, refused = [], []
    claimed: set = set()
    for node in graph.nodes:
        for rule in RULES:
            found = rule.match(node)
            if found is None:
                continue
            if isinstance(found, NotProvable):
                refused.append(found)
            elif claimed.isdisjoint(found.nodes):
                claimed.update(found.nodes)
                matches.append(found)
            break
    return matches, refused
