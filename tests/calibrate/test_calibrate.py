"""calibrate() on the committed accuracy model at short contexts: weights change, the written
"fixed" config loads through gsa_compile.optimize, and the profiled policy is a valid config."""

import torch

import gsa_compile
from gsa_compile.accuracy import make_samples
from gsa_compile.calibration import LayerCapture, profile_layers
from gsa_compile.config import GSAConfig


def test_calibration_changes_weights_and_its_config_loads_through_optimize(accuracy_model, tmp_path):
    samples = make_samples("kv", 256, 1, seed=7) + make_samples("needle", 256, 1, seed=7)
    config = GSAConfig.for_model(accuracy_model, chunk_size=16, must_select_blocks=[0, -1])
    result = gsa_compile.calibrate(
        accuracy_model, samples, config, epochs=1, iterations=3, out_dir=str(tmp_path), profile=True,
        profile_options={"decode_queries": 4}, progress=False,
    )
    assert sorted(result.weights) == list(range(6))
    for layer, weight in result.weights.items():
        assert weight.shape == (2, 64, 64)
        assert not torch.allclose(weight, result.initial_weights[layer])

    loaded = gsa_compile.load_config(result.config_path)
    assert loaded.hash_weight_type == "fixed" and loaded.hash_weight == "hash_weights.safetensors"
    assert loaded.top_k_ratio_per_layer == result.config.top_k_ratio_per_layer
    assert len(result.profile.layers) == 6 and "blocks for 90% mass" in result.profile.table()

    model = gsa_compile.optimize(accuracy_model, result.config_path)
    try:
        sparse = [site for site in model.gsa_runtime.sites.values() if site.policy == "sparse"]
        assert sparse, "the profiled config keeps at least one selecting layer"
        for site in sparse:
            assert torch.equal(site.hash_weight, result.weights[site.layer])
        ids = samples[0].input_ids[None]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        assert out.shape == (1, 258)
    finally:
        gsa_compile.capture.hf.restore_transformers(model)


def _capture(keys, queries) -> LayerCapture:
    return LayerCapture([queries], [keys], [keys.shape[1] - queries.shape[1]], scale=0.125)


def test_profile_turns_diffuse_layers_dense_and_overlapping_layers_into_reuse():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 512, 64, generator=generator)
    sharp_queries = 4.0 * keys[:, -8:].repeat_interleave(4, dim=0)  # each query attends to itself
    diffuse_queries = torch.zeros(8, 8, 64)  # uniform attention: needs 90% of the blocks
    captures = {
        0: _capture(keys, diffuse_queries),
        1: _capture(keys, sharp_queries),
        2: _capture(keys, sharp_queries),  # the same selections as layer 1
        3: _capture(torch.randn(2, 512, 64, generator=generator), sharp_queries),
    }
    config = GSAConfig(num_hidden_layers=4, head_dim=64, hash_bits=64, chunk_size=16, must_select_blocks=[0, -1])
    profile = profile_layers(captures, config, ratio=0.25, decode_queries=8)
    policies = [(entry.policy, entry.reuse_of) for entry in profile.layers]
    assert policies[0] == ("dense", None)
    assert policies[1] == ("sparse", None)
    assert policies[2] == ("reuse", 1)
    assert profile.layers[2].jaccard[1] == 1.0
    assert profile.layers[0].share_for_mass > 0.85 > profile.layers[1].share_for_mass

    from gsa_compile.calibration import apply_profile

    profiled = apply_profile(config, profile)
    assert profiled.top_k_ratio_per_layer[0] == 1
    assert profiled.top_k_index_reuse[2] == 1 and profiled.layer_policy(2) == "reuse"
