"""What the passes share while rewriting one graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import GSAConfig
from ..report import Report
from .codes_state import CodesState


@dataclass
class PassContext:
    """Inputs and results of one pipeline run.

    config: the GSA config (None: derive one from the sites found, default policy).
    rewrite: False to only find, number and report the sites (gsa_compile.inspect).
    whole_model: the graph holds every attention of the model (export, inspect), so its site
    count must equal the config's num_hidden_layers; a torch.compile graph may be one piece of
    a model split by graph breaks, so there only layer ids beyond the config are refused.
    state: the codes state of the rewritten model; the graphs of one model share it."""

    route: str
    config: Optional[GSAConfig] = None
    rewrite: bool = True
    whole_model: bool = True
    config_derived: bool = False
    state: CodesState = field(default_factory=CodesState)
    example_inputs: Optional[list] = None  # real tensors of the graph's placeholders (torch.compile)
    report: Report = None
    matches: list = field(default_factory=list)  # AttentionMatch, in graph order
    policies: dict = field(default_factory=dict)  # layer -> "sparse" | "dense" | "reuse"
    reuse_sources: dict = field(default_factory=dict)  # layer -> layer whose selection it reads
    notes: dict = field(default_factory=dict)  # layer -> note for the report
    rewrite_order: list = field(default_factory=list)  # non-dense layers, reuse sources first
    weights: dict = field(default_factory=dict)  # layer -> get_attr node of its hash weight
    codes: dict = field(default_factory=dict)  # layer -> (codes node, norms node or None, cache kind)
    # (layer, placeholder index of past, flat output index of cat([past, new])) of growing caches
    growing_links: list = field(default_factory=list)
    numbering: str = ""  # how layers were numbered: "module_path" or "graph_order"
    parameter_names: dict = field(default_factory=dict)  # id(parameter tensor) -> qualified name
    # (rank, size) when the graph holds this rank's consecutive share of every attention's heads
    # (tensor parallelism with local heads); None: read from DTensor weights, if any
    tensor_parallel: Optional[tuple] = None

    def __post_init__(self):
        if self.report is None:
            self.report = Report(route=self.route)
