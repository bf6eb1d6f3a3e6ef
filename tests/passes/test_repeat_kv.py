"""GQA/MQA head repetition is unwrapped: the GSA site reads the un-repeated K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsa_compile import export
from gsa_compile.capture.fx_examples import repeat_kv
from gsa_compile.passes.site_runtime import gsa_site

from helpers import EXACT, config, decode_inputs

REPEATS = {
    "repeat_kv": lambda x, g: repeat_kv(x, g),
    "unsqueeze_expand": lambda x, g: x.unsqueeze(2).expand(-1, -1, g, -1, -1).reshape(x.shape[0], -1, *x.shape[2:]),
    "repeat_interleave": lambda x, g: x.repeat_interleave(g, dim=1),
    "tile": lambda x, g: x.repeat(1, g, 1, 1),  # head i reads KV head i % Hkv: not the GQA convention
}


class RepeatedSDPA(torch.nn.Module):
    def __init__(self, how: str, groups: int):
        super().__init__()
        self.how, self.groups = how, groups

    def forward(self, q, k, v):
        repeat = REPEATS[self.how]
        return F.scaled_dot_product_attention(q, repeat(k, self.groups), repeat(v, self.groups))


def _site_key_heads(graph_module) -> list[int]:
    calls = [n for n in graph_module.graph.nodes if n.target is gsa_site]
    return [call.args[1].meta.get("val", call.args[1].meta.get("example_value")).shape[1] for call in calls]


@pytest.mark.parametrize("how", sorted(REPEATS))
@pytest.mark.parametrize("kv_heads", [1, 2])  # MQA and GQA
def test_repeat_is_unwrapped(how, kv_heads):
    q, k, v = decode_inputs(heads=4, kv_heads=kv_heads)
    module = RepeatedSDPA(how, 4 // kv_heads)
    captured = {}

    def keep_graph(gm, example_inputs, **options):
        from gsa_compile.capture.dynamo_backend import gsa_backend

        compiled = gsa_backend(gm, example_inputs, options={"config": config(), "compiler": "eager"})
        captured["gm"] = gm
        return compiled

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=keep_graph)(q, k, v)
    torch.testing.assert_close(out, module(q, k, v), **EXACT)
    unwrapped = how != "tile"
    assert _site_key_heads(captured["gm"]) == [kv_heads if unwrapped else 4]


def test_export_reads_unrepeated_keys():
    q, k, v = decode_inputs(heads=4, kv_heads=2)
    module = RepeatedSDPA("repeat_kv", 2)
    program = export(module, (q, k, v), config=config())
    assert "repeat_kv unwrapped" in program.gsa_report.sites[0].note
    assert program.gsa_report.sites[0].gqa_groups == 2
    encode_inputs = [n.args[0] for n in program.graph.nodes if n.target is torch.ops.gsa.encode.default]
    assert [node.meta["val"].shape[1] for node in encode_inputs] == [2]
    # The repeated K/V is not materialised: no 5-D expand of the keys or values is left.
    expands = [n for n in program.graph.nodes if n.target is torch.ops.aten.expand.default]
    assert not [n for n in expands if n.meta["val"].dim() == 5]
    torch.testing.assert_close(program.module()(q, k, v), module(q, k, v), **EXACT)
