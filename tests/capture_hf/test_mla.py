"""MLA latent-space selection on the HF route (tiny DeepSeek-V3, random weights)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from gsa_compile import mla
from gsa_compile.capture.hf import optimize_transformers
from gsa_compile.capture.hf_attention import DecodeStep
from gsa_compile.capture.hf_mla import latent_layout
from gsa_compile.errors import GSAConfigError
from gsa_compile.kernels import reference

from .helpers import CHUNK, assert_codes_match_keys, decode_logits, gsa_config
from .tiny_models import COMMON, VOCAB

HEADS = 8
# The DeepSeek configs' code: 512 latent bits + 64 rope bits = 72 bytes per token.
LATENT_BITS, ROPE_BITS = 512, 64


def _deepseek_v3():
    config = transformers.DeepseekV3Config(**{
        **COMMON, "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "kv_lora_rank": 32, "q_lora_rank": None,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 2,
        "n_group": 1, "topk_group": 1,
    })
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def original():
    return _deepseek_v3()


def _config(model, **overrides):
    return gsa_config(model, hash_bits_kv_lora=LATENT_BITS, hash_bits_qk_rope=ROPE_BITS,
                      hash_bits=LATENT_BITS + ROPE_BITS, **overrides)


def _prompt(batch=1, length=45, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_full_budget_equals_dense_through_prefill_and_16_decode_steps(original):
    model = optimize_transformers(copy.deepcopy(original), _config(original))
    assert all(site.latent is not None for site in model.gsa_runtime.computing_sites())
    prompt = _prompt(batch=2)
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # a left-padded row: its padding is never valid
    expected, _ = decode_logits(original, prompt, 16, attention_mask=mask)
    got, cache = decode_logits(model, prompt, 16, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    stats = model.gsa_runtime.total_stats()
    assert stats.sparse_calls == 16 * 3  # layers 1 and 3 select, layer 2 reuses layer 1's selection
    assert assert_codes_match_keys(cache) == 2


def test_codes_are_one_latent_code_per_token(original):
    model = optimize_transformers(copy.deepcopy(original), _config(original))
    prompt = _prompt(batch=2)
    _, cache = decode_logits(model, prompt, 3)
    codes = cache.layers[1].codes
    # One KV head whatever the number of query heads: (512 + 64) / 8 bytes per token.
    assert tuple(codes.shape) == (2, 1, prompt.shape[1] + 3, (LATENT_BITS + ROPE_BITS) // 8)
    assert model.gsa_runtime.sites[1].hash_weight.shape == (1, 32 + 8, LATENT_BITS + ROPE_BITS)
    assert "one 72-byte code per token for all 8 heads" in model.gsa_report.sites[1].note


def test_selection_equals_the_literal_latent_reference(original, monkeypatch):
    budget = 3 * CHUNK
    model = optimize_transformers(copy.deepcopy(original), _config(original, budget_tokens=budget))
    calls = []
    select = mla.latent_select_blocks

    def spy(query, w_uk, nope_dim, *args, **kwargs):
        blocks = select(query, w_uk, nope_dim, *args, **kwargs)
        calls.append((query, w_uk, nope_dim, blocks))
        return blocks

    monkeypatch.setattr(mla, "latent_select_blocks", spy)
    prompt = _prompt(length=70)
    _, cache = decode_logits(model, prompt, 0)
    step = DecodeStep(model.gsa_runtime, cache)
    with torch.no_grad():
        model(prompt[:, -1:], use_cache=True, cache=cache, gsa_step=step)
    assert len(calls) == 2  # layers 1 and 3
    for (query, w_uk, nope_dim, blocks), layer in zip(calls, (1, 3)):
        site, cached = model.gsa_runtime.sites[layer], cache.layers[layer]
        assert torch.equal(w_uk, model.model.layers[layer].self_attn.kv_b_proj.weight.view(HEADS, 28, 32)[:, :16])
        similarity = mla.reference_similarity(query, w_uk, nope_dim, cached.keys, cached.values, site.hash_weight)
        num_keys = similarity.shape[-1]
        n_blocks = -(-num_keys // CHUNK)
        padded = torch.nn.functional.pad(similarity, (0, n_blocks * CHUNK - num_keys), value=float("-inf"))
        scores = padded.view(1, n_blocks, CHUNK).amax(-1)
        scores[:, [0, n_blocks - 1]] = float("inf")  # must_select_blocks [0, -1]
        order = sorted(range(n_blocks), key=lambda b: (-float(scores[0, b]), b))
        expected = torch.tensor(sorted(order[: budget // CHUNK]), dtype=torch.int32)
        assert torch.equal(blocks[0, 0], expected), layer
        assert torch.equal(blocks, expected.expand(1, HEADS, -1))
        assert torch.equal(step.selections[layer], blocks)
        # The kernels' own oracle agrees with the literal one.
        absorbed = mla.absorb_query(query, w_uk, nope_dim)
        assert torch.equal(reference.token_similarity(absorbed, cached.codes, site.hash_weight)[:, 0], similarity)


def test_expanded_keys_where_the_config_is_not_mla(original):
    head_dim = 16 + 8
    config = gsa_config(original).replace(is_mla=False, head_dim=head_dim, hash_bits=head_dim)
    model = optimize_transformers(copy.deepcopy(original), config)
    assert all(site.latent is None for site in model.gsa_runtime.computing_sites())


def test_an_mla_config_for_other_latent_dims_is_refused(original):
    config = gsa_config(original).replace(kv_lora_rank=64, head_dim=64 + 8)
    with pytest.raises(GSAConfigError, match="kv_lora_rank=64"):
        optimize_transformers(copy.deepcopy(original), config)


def test_a_quantized_up_projection_keeps_expanded_keys(original):
    module = copy.deepcopy(original.model.layers[1].self_attn)
    module.kv_b_proj = torch.nn.Sequential(module.kv_b_proj)  # anything but a plain Linear
    layout, why = latent_layout(module, _config(original))
    assert layout is None and "kv_b_proj" in why


def test_the_onnx_step_refuses_latent_selection_with_the_reason(original):
    from gsa_compile.errors import GSAError
    from gsa_compile.onnx import DecodeStep

    model = copy.deepcopy(original)
    with pytest.raises(GSAError, match=r"latent space.*is_mla=False, head_dim=24"):
        DecodeStep(model, _config(original))
    assert getattr(model, "gsa_runtime", None) is None  # left as given


@pytest.mark.parametrize("cache_implementation, beams", [("static", 1), (None, 2)])
def test_generate_with_static_cache_and_beams_equals_dense_at_full_budget(original, cache_implementation, beams):
    model = optimize_transformers(copy.deepcopy(original), _config(original, key_norm_weighting=beams > 1))
    kwargs = dict(max_new_tokens=6, num_beams=beams, do_sample=False, cache_implementation=cache_implementation,
                  return_dict_in_generate=True)
    prompt = _prompt(length=30)
    out = model.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, original.generate(prompt, **kwargs).sequences)
    assert model.gsa_runtime.total_stats().sparse_calls > 0


@pytest.mark.slow
def test_static_generate_compiles_the_latent_selection_into_one_graph(original):
    from torch._dynamo.utils import counters

    from .test_compiled_decode import _auto_compile
    from .test_compiled_decode import _prompt as padded_prompt

    model = optimize_transformers(copy.deepcopy(original), _config(original, budget_tokens=2 * CHUNK))
    ids, mask = padded_prompt()
    options = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, cache_implementation="static",
                   return_dict_in_generate=True)
    eager = model.generate(ids, disable_compile=True, **options)
    model.gsa_runtime.reset_stats()
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(ids, compile_config=_auto_compile(), **options)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, "the decode step recompiled"
    assert torch.equal(compiled.sequences, eager.sequences)
    assert model.gsa_runtime.total_stats().sparse_calls == 3 * 8


def test_tensor_parallel_shards_keep_expanded_keys(original):
    from gsa_compile.sharding import HeadShard

    module = original.model.layers[1].self_attn
    layout, why = latent_layout(module, _config(original), HeadShard(0, HEADS // 2, HEADS))
    assert layout is None and "tensor parallelism" in why
    assert latent_layout(module, _config(original))[0] is not None
