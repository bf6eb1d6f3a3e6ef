"""A tiny random-weight Qwen3 exported as a GSA decode step with a dense, a selecting and a
reusing layer: names, a 16-step greedy loop in onnxruntime (prefill included, present fed back
as past) against the PyTorch GSA model, codes encoded once, and what is refused."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import gsa_compile
from gsa_compile.onnx import DOMAIN, DecodeStep, export_decode_step, greedy_decode, onnx_runner, torch_runner

PROMPT, NEW_TOKENS, VOCAB = 40, 16, 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )
    model = Qwen3ForCausalLM(config).eval()
    # Layer 0 dense, layer 1 selects, layer 2 reuses layer 1's selection; decode steps are sparse.
    gsa_config = gsa_compile.GSAConfig.for_model(
        model, chunk_size=4, top_k_ratio_per_layer=[1, 0.4, 0.4], top_k_index_reuse=[-1, -1, 1],
        must_select_blocks=[0, -1], cpu_seq_len_threshold=8,
    )
    step = DecodeStep(copy.deepcopy(model), gsa_config)
    path = tmp_path_factory.mktemp("decode") / "qwen3_step.onnx"
    proto = export_decode_step(step, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, gsa_config, step, proto, session


def _prompt(batch=2, pad=5):
    ids = np.random.default_rng(0).integers(0, VOCAB, (batch, PROMPT))
    mask = np.ones_like(ids)
    mask[-1, :pad] = 0  # the last row is left-padded
    return ids, mask


def test_cache_inputs_and_outputs_are_named_per_layer(exported):
    _, _, _, proto, _ = exported
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.key_codes" in inputs and "present.1.key_codes" in outputs
    for layer in range(3):
        for kind in ("key", "value"):
            assert f"past_key_values.{layer}.{kind}" in inputs and f"present.{layer}.{kind}" in outputs
    assert "past_key_values.0.key_codes" not in inputs  # dense and reusing layers keep no codes
    assert "past_key_values.2.key_codes" not in inputs
    ops = sorted({node.op_type for node in proto.graph.node if node.domain == DOMAIN})
    assert ops == ["Attention", "Encode", "ReuseAttention"]
    onnx.checker.check_model(proto, full_check=True)


def test_greedy_decode_in_onnxruntime_gets_the_pytorch_gsa_models_tokens(exported):
    model, gsa_config, step, _, session = exported
    ids, mask = _prompt()
    onnx_tokens = greedy_decode(onnx_runner(session, step), step, ids, NEW_TOKENS, attention_mask=mask)
    step_tokens = greedy_decode(torch_runner(step), step, ids, NEW_TOKENS, attention_mask=mask)
    optimized = gsa_compile.optimize(copy.deepcopy(model), gsa_config)  # the Hugging Face GSA route
    with torch.no_grad():
        generated = optimized.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0,
        )
    assert optimized.gsa_runtime.total_stats().sparse_calls > 0
    np.testing.assert_array_equal(onnx_tokens, step_tokens)
    np.testing.assert_array_equal(onnx_tokens, generated[:, PROMPT:].numpy())


def test_a_session_with_the_cpu_kernel_decodes_the_same_tokens(exported):
    from gsa_compile.onnx import runtime

    if runtime.availability() is not None:
        pytest.skip(f"the gsa kernels cannot be registered here: {runtime.availability()}")
    _, _, step, proto, session = exported
    ids, mask = _prompt()
    before = dict(runtime.calls)
    fast = greedy_decode(onnx_runner(gsa_compile.onnx.session(proto.SerializeToString()), step), step, ids, NEW_TOKENS, attention_mask=mask)
    for op in ("SelectTopBlocks", "SparseAttention"):
        assert runtime.calls[op] > before.get(op, 0)
    np.testing.assert_array_equal(fast, greedy_decode(onnx_runner(session, step), step, ids, NEW_TOKENS,
                                                      attention_mask=mask))


def test_a_decode_step_encodes_only_the_new_keys(exported):
    _, _, step, _, session = exported
    ids, mask = _prompt(pad=0)
    rng = np.random.default_rng(1)
    past = [t.numpy() for t in step.empty_past(2, PROMPT)]
    # Codes that match no key: a step that re-encoded the cache would overwrite them.
    past = [rng.integers(0, 256, p.shape, dtype=np.uint8) if p.dtype == np.uint8 else rng.standard_normal(p.shape,
            dtype=np.float32) for p in past]
    feeds = {"input_ids": ids[:, -1:], "attention_mask": np.ones((2, PROMPT + 1), np.int64),
             "position_ids": np.full((2, 1), PROMPT)}
    feeds.update(zip(step.past_names(), past))
    outputs = dict(zip(step.output_names(), session.run(step.output_names(), feeds)))
    past_codes = feeds["past_key_values.1.key_codes"]
    np.testing.assert_array_equal(outputs["present.1.key_codes"][:, :, :PROMPT], past_codes)
    expected = dict(zip(step.output_names(), torch_runner(step)(feeds)))
    np.testing.assert_array_equal(outputs["present.1.key_codes"], expected["present.1.key_codes"])
    np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-4)


def test_dynamic_dims_have_the_names_decoder_runtimes_use(exported):
    _, _, _, proto, _ = exported
    dims = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*proto.graph.input, *proto.graph.output]}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["past_key_values.1.key_codes"][:3] == ["batch_size", 2, "past_sequence_length"]
    assert dims["present.1.key_codes"][:3] == ["batch_size", 2, "total_sequence_length"]
    assert dims["logits"] == ["batch_size", "sequence_length", VOCAB]


def test_a_model_without_a_gsa_site_is_refused_with_the_reason(tmp_path):
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    dense = gsa_compile.GSAConfig.for_model(model, top_k_ratio_per_layer=[1.0])
    with pytest.raises(gsa_compile.GSAError, match="no GSA site"):
        gsa_compile.export_onnx(model, (torch.zeros(2, 4, dtype=torch.long),), str(tmp_path / "x.onnx"), config=dense)


def test_an_encoder_decoder_model_is_refused_naming_it():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                d_kv=16)).eval()
    with pytest.raises(gsa_compile.GSAError, match="T5ForConditionalGeneration is an encoder-decoder"):
        DecodeStep(model, None)


def test_a_cache_with_more_than_keys_and_values_is_refused_naming_the_layer():
    """A cache layer that is not a growing key/value store (recurrent state, quantized) cannot
    travel as past/present tensors."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, QuantoQuantizedLayer

    from gsa_compile.onnx.decode import cache_layouts

    cache = DynamicCache()
    cache.layers += [DynamicLayer(), QuantoQuantizedLayer.__new__(QuantoQuantizedLayer)]
    cache.layers[0].update(torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 8))
    with pytest.raises(gsa_compile.GSAError, match="MyLM: cache layer 1 is a QuantoQuantizedLayer"):
        cache_layouts(cache, "MyLM")
