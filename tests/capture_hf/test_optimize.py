"""optimize_transformers: configs, report, dtype moves, switching GSA off and back."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import gsa_compile
from gsa_compile import GSAConfigError
from gsa_compile.capture.hf import gsa_disabled, optimize_transformers, restore_transformers

from .helpers import decode_logits, gsa_config
from .tiny_models import VOCAB, build


def _prompt(length=48):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(3))


def test_default_config_follows_the_seed_policy():
    model = optimize_transformers(build("qwen3"))
    policies = [site.policy for site in model.gsa_report.sites]
    # Four layers: the default "first 2 and last 3 dense" would leave none sparse, so only layer 0 is.
    assert policies == ["dense", "sparse", "sparse", "sparse"]
    assert model.gsa_report.route == "hf_interface"
    assert "4 attention sites via hf_interface: 3 sparse, 0 reuse, 1 dense" in model.gsa_report.table()


def test_shipped_config_name_is_loaded_and_a_model_mismatch_warned(caplog):
    model = build("qwen3")
    model.config._name_or_path = "my-org/tiny-qwen3"
    with pytest.raises(GSAConfigError, match="num_hidden_layers=36"):
        optimize_transformers(model, "Qwen/Qwen3-4B")
    assert "made for another model" in caplog.text
    shipped = gsa_compile.load_config("Qwen/Qwen3-4B")
    fitted = shipped.replace(num_hidden_layers=4, head_dim=16, model_name="my-org/tiny-qwen3")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        optimize_transformers(model, fitted)
    assert "made for another model" not in caplog.text


def test_sliding_window_layers_stay_dense_with_a_note():
    model = optimize_transformers(build("gemma3"), gsa_compile.GSAConfig(num_hidden_layers=4, head_dim=16, top_k_ratio_per_layer=[0.5] * 4, top_k_index_reuse=[-1, -1, 1, 1]))
    sites = {site.layer: site for site in model.gsa_report.sites}
    assert [sites[layer].policy for layer in range(4)] == ["dense", "sparse", "dense", "reuse"]
    assert "sliding" in sites[0].note and sites[3].reuse_of == 1


def test_reuse_of_a_layer_kept_dense_computes_its_own_selection():
    config = gsa_compile.GSAConfig(num_hidden_layers=4, head_dim=16, top_k_ratio_per_layer=[0.5] * 4, top_k_index_reuse=[-1, -1, 0, -1])
    model = optimize_transformers(build("gemma3"), config)
    site = {site.layer: site for site in model.gsa_report.sites}[2]
    assert site.policy == "dense"  # layer 2 is sliding itself
    config = config.replace(top_k_index_reuse=[-1, -1, -1, 0])
    site = {site.layer: site for site in optimize_transformers(build("gemma3"), config).gsa_report.sites}[3]
    assert site.policy == "sparse" and "computes its own selection" in site.note


def test_hash_weights_are_float32_buffers_that_follow_the_model():
    original = build("llama")
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original))
    weight = model.gsa_runtime.sites[1].hash_weight.clone()
    assert weight.dtype == torch.float32
    assert "gsa_site.hash_weight" not in " ".join(model.state_dict())
    model.to(torch.bfloat16)
    site = model.gsa_runtime.sites[1]
    assert site.hash_weight.dtype == torch.float32 and torch.equal(site.hash_weight, weight)
    assert model.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    tokens = model.generate(_prompt(), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 52) and site.stats.sparse_calls == 3


def test_gsa_disabled_runs_the_original_and_restore_undoes_everything():
    original = build("llama")
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original, budget_tokens=16))
    dense, _ = decode_logits(original, _prompt(96), 3)
    with gsa_disabled(model):
        assert model.config._attn_implementation == "sdpa"
        off, _ = decode_logits(model, _prompt(96), 3)
    torch.testing.assert_close(off, dense, atol=1e-5, rtol=1e-5)
    assert model.gsa_runtime.sites[1].stats.sparse_calls == 0
    on, _ = decode_logits(model, _prompt(96), 3)
    assert (on - dense).abs().max() > 1e-4
    restore_transformers(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "gsa_report")
    assert not hasattr(model.model.layers[1].self_attn, "gsa_site")


def test_a_model_sharing_the_config_object_keeps_its_own_attention():
    # transformers keeps the attention implementation on the config: a dense reference built
    # from the same config object must not start running GSA's (it has no sites).
    original = build("llama")
    model = copy.deepcopy(original)
    reference = type(original)(model.config).eval()
    reference.load_state_dict(model.state_dict())
    dense, _ = decode_logits(reference, _prompt(96), 3)
    optimize_transformers(model, gsa_config(original, budget_tokens=16))
    assert reference.config._attn_implementation == "sdpa"
    assert model.model.layers[1].self_attn.config is model.config
    after, _ = decode_logits(reference, _prompt(96), 3)
    torch.testing.assert_close(after, dense)
    optimize_transformers(reference, gsa_config(original, budget_tokens=16))  # the original's name stays wrappable
    assert reference.config._attn_implementation == "gsa"


def test_eager_models_keep_their_own_eager_attention_for_dense_layers():
    original = build("gemma2")
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original))
    assert model.config._attn_implementation == "gsa_eager"
    from transformers.models.gemma2 import modeling_gemma2

    assert model.gsa_runtime.sites[0].dense_fn is modeling_gemma2.eager_attention_forward


def test_unsupported_attention_implementation_is_refused():
    model = build("llama")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(GSAConfigError, match="flex_attention"):
        optimize_transformers(model, gsa_config(model))


def test_a_config_for_another_key_width_is_refused():
    with pytest.raises(gsa_compile.GSAConfigError, match="head_dim=128"):
        optimize_transformers(build("llama"), gsa_compile.GSAConfig(num_hidden_layers=4, head_dim=128, top_k_ratio_per_layer=[0.5] * 4))
