"""calibrate() on a tiny DeepSeek-V3 with an MLA config: latent-space captures, block-diagonal
training, both weight parts written and loaded by the HF route."""

import torch
import transformers

import gsa_compile
from gsa_compile.calibration.capture import capture_layers
from gsa_compile.calibration.calibration import mla_layouts
from gsa_compile.calibration.probe import attention_probe, dense_attention, forward_tokens
from gsa_compile.capture.hf import restore_transformers
from gsa_compile.config import GSAConfig

LATENT, ROPE, HEADS = 32, 8, 4


def _model():
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, kv_lora_rank=LATENT, q_lora_rank=None, qk_rope_head_dim=ROPE, qk_nope_head_dim=16,
        v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=3, n_group=1, topk_group=1, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(config).eval()


def _samples():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 96, (48,), generator=gen) for _ in range(2)]


def test_latent_captures_hold_the_layers_logits():
    model = _model()
    config = GSAConfig.for_model(model)
    captures = capture_layers(model, _samples()[:1], latent=mla_layouts(model, config))
    capture = captures[1]
    assert capture.kv_heads == 1 and capture.groups == HEADS and capture.head_dim == LATENT + ROPE
    # The absorbed queries' logits against the latent keys are those against the expanded keys.
    seen = {}

    def probe(layer, module, query, key, value, attention_mask, scaling, **kwargs):
        seen[layer] = torch.einsum("hqd,hld->hql", query[0, :, query.shape[2] // 2:].float(), key[0].float())
        return dense_attention(module, query, key, value, attention_mask, scaling, **kwargs)

    with attention_probe(model, probe), torch.no_grad():
        forward_tokens(model, _samples()[0][None])
    latent_logits = torch.einsum("hqd,ld->hql", capture.queries[0], capture.keys[0][0])
    torch.testing.assert_close(latent_logits, seen[1], rtol=1e-4, atol=1e-4)


def test_mla_calibration_writes_both_parts_and_the_route_loads_them(tmp_path):
    model = _model()
    config = GSAConfig.for_model(model, chunk_size=8, must_select_blocks=[0, -1], hash_bits_kv_lora=LATENT,
                                 hash_bits_qk_rope=ROPE, hash_bits=LATENT + ROPE)
    result = gsa_compile.calibrate(model, _samples(), config, epochs=1, iterations=3, out_dir=str(tmp_path),
                                   progress=False)
    for layer, weight in result.weights.items():
        assert weight.shape == (1, LATENT + ROPE, LATENT + ROPE)
        assert (weight[0, :LATENT, LATENT:] == 0).all() and (weight[0, LATENT:, :LATENT] == 0).all()
        assert not torch.allclose(weight[0, :LATENT, :LATENT], result.initial_weights[layer][0, :LATENT, :LATENT])
    loaded = gsa_compile.load_config(result.config_path)
    assert loaded.hash_weight_type == "fixed"
    assert (loaded.hash_weight_kv_lora, loaded.hash_weight_qk_rope) == (
        "hash_weights_kv_lora.safetensors", "hash_weights_qk_rope.safetensors")
    optimized = gsa_compile.optimize(model, result.config_path)
    try:
        selecting = optimized.gsa_runtime.computing_sites()
        assert selecting and all(site.latent is not None for site in selecting)
        for site in selecting:
            assert torch.equal(site.hash_weight, result.weights[site.layer])
        ids = _samples()[0][None]
        out = optimized.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        assert out.shape == (1, 50)
    finally:
        restore_transformers(optimized)
