"""The pass pipeline: layer numbering, config resolution, per-layer policy and reuse wiring."""

from __future__ import annotations

import operator

import pytest
import torch

from gsa_compile import GSAConfig, GSAConfigError, export, inspect
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.capture.fx_examples import TinyDecoder
from gsa_compile.passes import PIPELINE
from gsa_compile.passes.site_runtime import gsa_site

from helpers import EXACT, config


def test_pipeline_order():
    assert [p.__name__ for p in PIPELINE] == [
        "match_attention", "number_layers", "resolve_config", "apply_policy", "insert_codes_state",
        "rewrite_sites", "report_sites"]


def _decoder(layers=4):
    torch.manual_seed(0)
    return TinyDecoder(layers=layers).eval()


def test_layers_numbered_from_module_path():
    model = _decoder()
    report = inspect(model, torch.randint(0, 64, (1, 8)), model.empty_cache())
    assert [(s.layer, s.module_path) for s in report.sites] == [(i, f"layers.{i}") for i in range(4)]


class TwoAttentions(torch.nn.Module):
    """Two attention calls in one module: no numbered module path, so graph order."""

    def forward(self, q, k, v):
        first = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(first, k, v)


def test_layers_numbered_in_graph_order_without_numbered_modules():
    q = torch.randn(1, 2, 4, 16)
    report = inspect(TwoAttentions(), q, q, q)
    assert [site.layer for site in report.sites] == [0, 1]


class BrokenDecoder(TinyDecoder):
    """A graph break between layer 1 and layer 2 splits the model into two graphs."""

    def block(self, index, x, cache):
        out, _, _ = self.layers[index](self.norm(x), *cache[index])
        x = x + out
        return x + self.mlps[index](self.norm(x))

    def forward(self, ids, cache):
        x = self.block(1, self.block(0, self.embed(ids), cache), cache)
        torch._dynamo.graph_break()
        return self.head(self.norm(self.block(3, self.block(2, x, cache), cache)))


class LoopBrokenDecoder(TinyDecoder):
    """A graph break inside the layer loop: dynamo compiles each layer's frame on its own."""

    def forward(self, ids, cache):
        x = self.embed(ids)
        for attn, mlp, (past_key, past_value) in zip(self.layers, self.mlps, cache):
            out, _, _ = attn(self.norm(x), past_key, past_value)
            torch._dynamo.graph_break()
            x = x + out
            x = x + mlp(self.norm(x))
        return self.head(self.norm(x))


def test_module_path_numbering_survives_graph_breaks():
    torch.manual_seed(0)
    model = BrokenDecoder(layers=4).eval()
    report = inspect(model, torch.randint(0, 64, (1, 8)), model.empty_cache())
    assert sorted(site.layer for site in report.sites) == [0, 1, 2, 3]


def test_per_layer_frames_are_left_dense_and_reported():
    torch.manual_seed(0)
    model = LoopBrokenDecoder(layers=2).eval()
    report = inspect(model, torch.randint(0, 64, (1, 8)), model.empty_cache())
    assert not report.sites
    assert report.unmatched and "reuses that graph for every layer" in report.unmatched[0].reason


def _sites_of(gm):
    return [node for node in gm.graph.nodes if node.target is gsa_site]


def test_policy_dense_sparse_and_reuse_wiring():
    model = _decoder()
    cfg = config(layers=4, head_dim=8, ratio=0.5, budget_tokens=None).replace(
        top_k_ratio_per_layer=[1, 0.5, 0.5, 0.5], top_k_index_reuse=[-1, -1, -1, 1])
    graphs, reports = [], []

    def keep(gm, example_inputs):
        compiled = gsa_backend(gm, example_inputs, options={"config": cfg, "compiler": "eager", "reports": reports})
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        out, _ = torch.compile(model, backend=keep)(ids, model.empty_cache())
    torch.testing.assert_close(out, model(ids, model.empty_cache())[0], **EXACT)  # prefill runs dense
    report = reports[0]
    assert [(s.layer, s.policy, s.reuse_of) for s in report.sites] == [
        (0, "dense", None), (1, "sparse", None), (2, "sparse", None), (3, "reuse", 1)]
    calls = _sites_of(graphs[0])
    assert len(calls) == 3  # the dense layer keeps its SDPA
    reuse_blocks = calls[2].args[7]
    assert reuse_blocks.target is operator.getitem and reuse_blocks.args == (calls[0], 1)
    assert all(call.args[7] is None for call in calls[:2])


def test_explicit_config_with_wrong_layer_count_is_an_error():
    model = _decoder()
    args = (torch.randint(0, 64, (1, 8)), model.empty_cache())
    with pytest.raises(GSAConfigError, match="4 attention sites .* num_hidden_layers=3"):
        export(model, args, config=config(layers=3, head_dim=8))


def test_no_config_derives_one_layer_per_site():
    model = _decoder(layers=3)
    program = export(model, (torch.randint(0, 64, (1, 8)), model.empty_cache()))
    assert len(program.gsa_report.sites) == 3
    default = GSAConfig(num_hidden_layers=3)  # the default policy for three layers
    assert [s.policy for s in program.gsa_report.sites] == [default.layer_policy(i) for i in range(3)]


class HandWrittenLayers(torch.nn.Module):
    """Attention written by hand in numbered layers, no attribute that names heads or dims."""

    def __init__(self, layers=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 48) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            q, k, v = layer(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            x = x + ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(-1).matmul(v).transpose(1, 2).flatten(2)
        return x


def test_for_model_sizes_a_config_from_the_graph():
    model = HandWrittenLayers().eval()
    with pytest.raises(GSAConfigError, match="found no attention module"):
        GSAConfig.for_model(model)
    config = GSAConfig.for_model(model, torch.randn(1, 8, 16), budget_tokens=512)
    assert (config.num_hidden_layers, config.head_dim, config.hash_bits, config.budget_tokens) == (3, 8, 8, 512)
    decoder = _decoder(layers=2)
    sized = GSAConfig.for_model(decoder, torch.randint(0, 64, (1, 8)), cache=decoder.empty_cache())
    assert sized.num_hidden_layers == 2


def test_for_model_without_attention_in_the_graph_says_so():
    with pytest.raises(GSAConfigError, match="has no attention site"):
        GSAConfig.for_model(torch.nn.Linear(4, 4), torch.randn(2, 4))


@pytest.mark.parametrize("route", ["inspect", "torch.compile", "export"])
def test_config_with_another_depth_is_refused_on_every_route(route):
    model = _decoder(layers=2)
    args = (torch.randint(0, 64, (1, 8)), model.empty_cache())
    wrong = config(layers=3, head_dim=8)
    with pytest.raises(Exception) as raised:
        if route == "inspect":
            inspect(model, *args, config=wrong)
        elif route == "export":
            export(model, args, config=wrong)
        else:
            torch._dynamo.reset()
            with torch.no_grad():
                torch.compile(model, backend=gsa_backend, options={"config": wrong, "compiler": "eager"})(*args)
    error = raised.value if route != "torch.compile" else raised.value.inner_exception
    assert isinstance(error, GSAConfigError)
    assert "2 attention sites" in str(error) and "num_hidden_layers=3" in str(error)
