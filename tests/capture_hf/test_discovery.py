"""How the HF route finds attention sites beyond plain decoders: hybrids numbered by their own
layer index, cross-attention kept dense, per-layer shapes, layers the model keeps dense (its
own key selection) with the reason in the report, and models it cannot serve refused."""

from __future__ import annotations

import copy

import pytest
import torch

from gsa_compile.capture.hf import optimize_transformers, restore_transformers
from gsa_compile.capture.hf_cache import CodesMixin
from gsa_compile.errors import GSAConfigError, GSAError

from .helpers import assert_codes_match_keys, decode_logits
from .test_coverage import CLASSES, coverage

STEPS = 4


def _tiny(model_type):
    return coverage.build(model_type, CLASSES[model_type])


def _optimized(original, small=False):
    full, small_config = coverage.gsa_configs(original)
    return optimize_transformers(copy.deepcopy(original), small_config if small else full)


def _prompt(length=40):
    return torch.randint(3, coverage.VOCAB, (1, length), generator=torch.Generator().manual_seed(2))


def test_hybrid_sites_at_their_own_layer_index():
    original = _tiny("qwen3_next")  # DeltaNet layers 0-2, full attention at layer 3
    model = _optimized(original)
    assert model.gsa_runtime.config.num_hidden_layers == original.config.num_hidden_layers == 4
    assert sorted(model.gsa_runtime.sites) == [3]
    assert [site.module_path for site in model.gsa_report.sites] == ["model.layers.3.self_attn"]
    assert not any(hasattr(layer.linear_attn, "gsa_site") for layer in model.model.layers[:3])
    expected, _ = decode_logits(original, _prompt(), STEPS)
    got, cache = decode_logits(model, _prompt(), STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(cache.layers[3], CodesMixin)
    assert model.gsa_runtime.sites[3].stats.sparse_calls == STEPS


def test_hybrid_layer_with_state_and_keys_holds_codes():
    # Falcon-H1 runs Mamba and attention in every layer: one cache layer holds both.
    original = _tiny("falcon_h1")
    model = _optimized(original)
    expected, _ = decode_logits(original, _prompt(), STEPS)
    got, cache = decode_logits(model, _prompt(), STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert assert_codes_match_keys(cache) == len(model.gsa_runtime.sites)
    assert model.gsa_runtime.total_stats().sparse_calls == STEPS * len(model.gsa_runtime.sites)


def test_hybrid_config_must_cover_every_layer():
    original = _tiny("qwen3_next")
    full, _ = coverage.gsa_configs(original)
    with pytest.raises(GSAConfigError, match=r"has 4 layers \(attention at layers \[3\]\)"):
        optimize_transformers(copy.deepcopy(original), full.replace(num_hidden_layers=1))


def test_cross_attention_dense_self_attention_sparse():
    original = _tiny("bart")
    model = _optimized(original, small=True)
    decoder = model.model.decoder
    assert sorted(model.gsa_runtime.sites) == [0, 1, 2]
    for layer in decoder.layers:
        assert layer.self_attn.gsa_site.policy == "sparse"
        assert layer.encoder_attn.gsa_site.policy == "dense"
        assert "cross-attention" in layer.encoder_attn.gsa_site.note
    assert model.gsa_report.counts() == {"sparse": 3, "dense": 3, "reuse": 0}
    decode_logits(model, _prompt(80), STEPS)
    assert model.gsa_runtime.total_stats().sparse_calls == 3 * STEPS
    restore_transformers(model)
    assert not any(hasattr(module, "gsa_site") for module in model.modules())


def test_per_layer_head_dims():
    original = _tiny("gemma4_text")  # sliding layers of head dim 16, a global layer of 512
    model = _optimized(original)
    shapes = {layer: site.shape.key_dim for layer, site in model.gsa_runtime.sites.items()}
    assert shapes == {layer: attention.head_dim for layer, attention in
                      ((i, layer.self_attn) for i, layer in enumerate(model.model.layers))}
    assert len(set(shapes.values())) == 2
    expected, _ = decode_logits(original, _prompt(), STEPS)
    got, _ = decode_logits(model, _prompt(), STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_model_key_selection_kept_on_the_dense_path():
    # index_topk 8 < prompt: the model's indexer masks keys, under "gsa" as under sdpa.
    original = _tiny("deepseek_v32")
    model = _optimized(original)
    assert {site.policy for site in model.gsa_report.sites} == {"dense"}
    assert all("own indexer" in site.note for site in model.gsa_report.sites)
    expected, _ = decode_logits(original, _prompt(), STEPS)
    got, _ = decode_logits(model, _prompt(), STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_keys_tiled_after_the_cache_run_sparse_over_the_cached_heads():
    original = _tiny("jetmoe")  # tiles its 2 cached KV heads to 4 after the cache (repeat, not repeat_interleave)
    model = _optimized(original)
    expected, _ = decode_logits(original, _prompt(), STEPS)
    got, _ = decode_logits(model, _prompt(), STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    stats = model.gsa_runtime.total_stats()
    assert stats.sparse_calls == STEPS * len(model.gsa_runtime.sites) and not stats.dense_reasons.get("kv_heads_repeated")
    # At a small budget the selection is per cached head: the query heads that read it share it.
    small = _optimized(original, small=True)
    small_logits, _ = decode_logits(small, _prompt(80), STEPS)
    dense_logits, _ = decode_logits(original, _prompt(80), STEPS)
    assert small.gsa_runtime.total_stats().sparse_calls > 0
    assert not torch.allclose(small_logits, dense_logits, atol=1e-6)


def test_head_order_round_trip_groups_query_heads_by_the_cached_head_they_read():
    from gsa_compile.capture.hf_attention import head_order

    heads = torch.arange(12).view(1, 12, 1, 1).float()  # 2 tiles x 3 cached heads x 2 query heads each
    grouped = head_order(heads, tiles=2, kv_heads=3)
    cached = (heads.view(-1).long() // 2) % 3  # the cached head each original query head reads
    assert cached[grouped.view(-1).long()].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert torch.equal(head_order(grouped, tiles=2, kv_heads=3, inverse=True), heads)


def test_models_outside_the_interface_refused_with_the_modules_named():
    with pytest.raises(GSAError, match=r"transformer\.h\.0\.self_attention.*FX route"):
        optimize_transformers(_tiny("bloom"))


@pytest.mark.parametrize("model_type, why", [("bloom", "AttentionInterface"), ("hrm_text", "share a layer_idx")])
def test_optimize_takes_the_fx_route_where_the_hf_route_cannot_serve(model_type, why, caplog):
    import gsa_compile

    with caplog.at_level("WARNING", logger="gsa_compile.api"):
        model = gsa_compile.optimize(_tiny(model_type), compiler="eager")
    assert why in model.gsa.route_reason
    assert any("FX route" in record.getMessage() and why in record.getMessage() for record in caplog.records)
    assert getattr(model, "gsa_runtime", None) is None
    with pytest.raises(GSAError, match=why):
        optimize_transformers(_tiny(model_type))
