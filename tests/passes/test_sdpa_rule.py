"""Rule sdpa: every spelling of scaled_dot_product_attention, with its options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from gsa_compile import export
from gsa_compile.passes.matchers import find_attention
from gsa_compile.passes.matchers.record import AttentionMatch, NotProvable

from helpers import EXACT, config, decode_inputs, run_compiled

aten = torch.ops.aten


class Spelled(torch.nn.Module):
    def __init__(self, spelling: str, **options):
        super().__init__()
        self.spelling, self.options = spelling, options

    def forward(self, q, k, v, mask=None):
        if self.spelling == "functional":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.options)
        if self.spelling == "torch_c":
            return torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.options)
        if self.spelling == "aten":
            return aten.scaled_dot_product_attention.default(q, k, v, mask, **self.options)
        return aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, attn_mask=mask, **self.options)[0]


SPELLINGS = {"functional": "sdpa", "torch_c": "sdpa", "aten": "sdpa", "flash_cpu": "sdpa_flash_cpu"}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("route", ["compile", "export"])
def test_spelling_rewritten_exactly_and_sparse_with_small_budget(spelling, route):
    module = Spelled(spelling)
    q, k, v = decode_inputs()
    keep = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    keep[..., 3] = False
    mask = keep if spelling != "flash_cpu" else torch.zeros(1, 1, 1, 64).masked_fill(~keep, float("-inf"))
    for ratio, exact in ((0.999, True), (0.25, False)):
        if route == "compile":
            out, report = run_compiled(module, config(ratio=ratio), q, k, v, mask)
        else:
            program = export(module, (q, k, v, mask), config=config(ratio=ratio))
            out, report = program.module()(q, k, v, mask), program.gsa_report
        assert [site.pattern for site in report.sites] == [SPELLINGS[spelling]], report.table()
        if exact:
            torch.testing.assert_close(out, module(q, k, v, mask), **EXACT)
        else:
            assert (out - module(q, k, v, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("options, mask_kind", [
    ({"scale": 0.3}, "bool"),
    ({"enable_gqa": True}, "additive"),
    ({"is_causal": True}, None),
])
def test_sdpa_options(options, mask_kind):
    kv_heads = 1 if options.get("enable_gqa") else 4
    q, k, v = decode_inputs(heads=4, kv_heads=kv_heads)
    if options.get("is_causal"):  # prefill-shaped: causal is meaningful only with several queries
        q = torch.randn(1, 4, 64, 16)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, 1, 64, generator=torch.Generator().manual_seed(3)) > 0.2
    elif mask_kind == "additive":
        mask = torch.randn(1, 4, 1, 64)
    module = Spelled("functional", **options)
    out, report = run_compiled(module, config(), q, k, v, mask)
    assert report.sites[0].gqa_groups == 4 // kv_heads
    torch.testing.assert_close(out, module(q, k, v, mask), **EXACT)


def test_dropout_is_not_rewritten():
    q, k, v = decode_inputs()
    out, report = run_compiled(Spelled("functional", dropout_p=0.1), config(), q, k, v)
    assert not report.sites and "dropout_p=0.1" in report.unmatched[0].reason


def _graph_with(target, extra_args=(), used_outputs=(0,)):
    """A graph calling a CUDA-only SDPA backend op, with fake shapes (matched, not run)."""
    graph = fx.Graph()
    names = ("query", "key", "value")
    inputs = []
    for name, heads in zip(names, (4, 2, 2)):
        node = graph.placeholder(name)
        node.meta["val"] = torch.empty(1, heads, 1 if name == "query" else 32, 16, device="meta")
        inputs.append(node)
    call = graph.call_function(target, (*inputs, *extra_args))
    outs = [graph.call_function(__import__("operator").getitem, (call, i)) for i in used_outputs]
    graph.output(tuple(outs))
    return graph, inputs, call


@pytest.mark.parametrize("target, extra", [
    (aten._scaled_dot_product_flash_attention.default, ()),
    (aten._scaled_dot_product_efficient_attention.default, (None, False)),
    (aten._scaled_dot_product_cudnn_attention.default, (None, False)),
])
def test_backend_ops_are_matched(target, extra):
    graph, (q, k, v), call = _graph_with(target, extra)
    matches, refused = find_attention(graph)
    assert not refused and len(matches) == 1
    match = matches[0]
    assert isinstance(match, AttentionMatch) and (match.query, match.key, match.value) == (q, k, v)
    assert match.output.args == (call, 0) and match.gqa_groups == 2


def test_backend_op_with_logsumexp_used_is_refused():
    graph, _, _ = _graph_with(aten._scaled_dot_product_flash_attention.default, used_outputs=(0, 1))
    matches, refused = find_attention(graph)
    assert not matches and isinstance(refused[0], NotProvable) and "logsumexp" in refused[0].reason
