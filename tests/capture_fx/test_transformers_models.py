"""transformers models from tiny configs through torch.compile(backend="gsa") and gsa_compile.export:
every attention layer becomes a site, the rewrite is exact when the budget covers every block,
and the sparse path is live (a small budget on a longer cache changes the output)."""

from __future__ import annotations

import warnings

import pytest
import torch

from gsa_compile import export
from gsa_compile.capture.dynamo_backend import gsa_backend

from tiny_models import DENSE_BY_MODEL, MODELS, VOCAB, sparse_config, tiny_model

pytest.importorskip("transformers")

BUDGET = 28  # tokens: covers every block of a 25-key cache, not of a 61-key one
EXACT = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def quiet_and_fresh():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _decode_step(model, compiled, prompt, token):
    """Logits of one decode step after `prompt`, by the original model and by the compiled one
    (the prompt is prefilled eagerly: prefill runs dense anyway, and one compiled graph then
    serves every decode step)."""
    from transformers import DynamicCache

    caches = []
    for _ in range(2):
        cache = DynamicCache(config=model.config)
        model(prompt, past_key_values=cache, use_cache=True)
        caches.append(cache)
    want = model(token, past_key_values=caches[0], use_cache=True).logits
    return compiled(token, past_key_values=caches[1], use_cache=True).logits, want


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_compile_route(model_type):
    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    reports = []
    # dynamic=True would make Gemma2's softcap a symbolic float (left dense, reported); automatic
    # dynamic shapes keep config floats constant.
    compiled = torch.compile(model, backend=gsa_backend, dynamic=None if model_type == "gemma2" else True, options={
        "config": sparse_config(model, BUDGET), "compiler": "eager", "reports": reports})
    generator = torch.Generator().manual_seed(0)
    token = torch.randint(0, VOCAB, (1, 1), generator=generator)
    with torch.no_grad():
        got, want = _decode_step(model, compiled, torch.randint(0, VOCAB, (1, 24), generator=generator), token)
        torch.testing.assert_close(got, want, **EXACT)
        sparse, dense = _decode_step(model, compiled, torch.randint(0, VOCAB, (1, 60), generator=generator), token)
    assert (sparse - dense).abs().max() > 1e-4, "the small-budget decode step equals dense: sparse path not live"
    for report in reports:
        assert len(report.sites) == layers, report.table()
        assert report.counts()["sparse"] == layers - DENSE_BY_MODEL.get(model_type, 0), report.table()
        assert not report.unmatched, report.table()


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_export_route(model_type):
    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    program = export(model, (ids,), {"use_cache": False}, config=sparse_config(model, BUDGET))
    report = program.gsa_report
    assert len(report.sites) == layers and not report.unmatched, report.table()
    assert report.counts()["sparse"] == layers - DENSE_BY_MODEL.get(model_type, 0), report.table()
    attention_ops = [n for n in program.graph.nodes if n.target is torch.ops.gsa.attention.default]
    assert len(attention_ops) == report.counts()["sparse"]
    with torch.no_grad():
        got = program.module()(ids, use_cache=False).logits
        torch.testing.assert_close(got, model(ids, use_cache=False).logits, **EXACT)


def test_export_static_cache_decode_encodes_each_key_once():
    """transformers' exportable static-cache wrapper: decode-shaped program, index_copy_ cache
    updates; codes follow the cache, outputs match while the budget covers the cache."""
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model = tiny_model("llama")
    max_len = 32
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static", max_length=max_len,
                                               cache_config={"batch_size": 1, "max_cache_len": max_len})
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    reference = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_len)
    wrapper = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_len)
    example = {"input_ids": tokens[:, :1], "cache_position": torch.tensor([0])}
    program = export(wrapper, (), example, config=sparse_config(model, budget_tokens=12))
    assert all("codes: index_copy" in site.note for site in program.gsa_report.sites), program.gsa_report.table()
    runner = program.module()
    differs = []
    with torch.no_grad():
        for step in range(tokens.shape[1]):
            inputs = {"input_ids": tokens[:, step:step + 1], "cache_position": torch.tensor([step])}
            got, want = runner(**inputs), reference(**inputs)
            if step < 12:
                torch.testing.assert_close(got, want, **EXACT)
            else:
                differs.append((got - want).abs().max().item() > 1e-4)
    assert any(differs)
    state = program.gsa_codes_state
    kv_heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    # The whole static cache once when the program was built, then one key per step.
    assert state.keys_encoded == layers * kv_heads * (max_len + tokens.shape[1])
