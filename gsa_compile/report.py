"""What a rewrite did: the attention sites found (with their layer and policy) and what was
left dense with the reason. Every capture route returns one of these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .tables import format_table


@dataclass
class Site:
    """One attention site that was rewritten (or kept dense by the layer policy)."""

    layer: int
    pattern: str  # the matcher rule or route that found it, e.g. "sdpa", "matmul_softmax", "hf_interface"
    policy: str  # "sparse", "dense" or "reuse"
    module_path: str = ""
    reuse_of: Optional[int] = None
    gqa_groups: int = 1
    note: str = ""
    head_dim: int = 0  # the keys' feature size (what the hash weights project)


@dataclass
class Unmatched:
    """A candidate that was left untouched, and why rewriting it was not provably equivalent."""

    location: str
    reason: str


@dataclass
class Report:
    route: str
    sites: list[Site] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {"sparse": 0, "dense": 0, "reuse": 0}
        for site in self.sites:
            counts[site.policy] += 1
        return counts

    def table(self) -> str:
        """A plain-text table of the sites, then the unmatched candidates."""
        rows = [("layer", "policy", "pattern", "module", "note")]
        for site in sorted(self.sites, key=lambda s: s.layer):
            note = site.note or (f"reuses layer {site.reuse_of}" if site.reuse_of is not None else "")
            rows.append((site.layer, site.policy, site.pattern, site.module_path or "-", note))
        lines = [format_table(rows)]
        counts = self.counts()
        lines.append(
            f"{len(self.sites)} attention sites via {self.route}: {counts['sparse']} sparse, "
            f"{counts['reuse']} reuse, {counts['dense']} dense"
        )
        for item in self.unmatched:
            lines.append(f"left dense: {item.location}: {item.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
