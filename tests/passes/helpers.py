"""Shared pieces of the pass tests: configs whose sparse path runs at tiny sizes, and a run
through the gsa torch.compile backend (eager compiler: the rewrite, not Inductor, is tested)."""

from __future__ import annotations

import torch

from gsa_compile import GSAConfig
from gsa_compile.capture.dynamo_backend import gsa_backend

EXACT = dict(atol=1e-5, rtol=0)


def config(layers: int = 1, head_dim: int = 16, ratio: float = 0.999, chunk_size: int = 8, **changes) -> GSAConfig:
    """All layers sparse at `ratio` (0.999 selects every block), thresholds 0, no must-select."""
    fields = dict(num_hidden_layers=layers, head_dim=head_dim, hash_bits=16, chunk_size=chunk_size,
                  top_k_ratio_per_layer=[ratio] * layers, must_select_blocks=[], cpu_seq_len_threshold=0,
                  cpu_concurrency_threshold=0)
    fields.update(changes)
    return GSAConfig(**fields)


def run_compiled(module, cfg, *args, dynamic=False, **kwargs):
    """(output, report) of one call of `module` compiled with the gsa backend."""
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(module, backend=gsa_backend, dynamic=dynamic,
                             options={"config": cfg, "compiler": "eager", "reports": reports})
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    return out, reports[-1]


def decode_inputs(batch=1, heads=2, kv_heads=2, keys=64, dim=16, seed=0):
    """One query token against `keys` keys: the call shape on which GSA runs sparse."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=generator)
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    return q, k, v
