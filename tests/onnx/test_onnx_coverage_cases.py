"""Architectures of the ONNX coverage sweep (benchmarks/onnx_bench.py --coverage) that each
needed the exporter to handle something of their own: an epsilon the graph optimizer took for
zero (Helium), keys tiled over the cached heads (JetMoE), a cache class of the model's own
(MiniMax, refused with the reason)."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx_architectures import NEW_TOKENS, build, generated_by_onnxruntime, generated_by_pytorch, gsa_config, prompt

import gsa_compile
from gsa_compile.onnx import DOMAIN, DecodeStep, export_decode_step, torch_runner


def test_helium_rms_norm_keeps_its_epsilon_on_a_padding_token_row(tmp_path):
    """Helium's RMSNorm adds eps = 1e-8, which onnxscript's optimizer rewrote away as x + 0: the
    padding token's all-zero embedding then normed to 0 * inf = NaN in onnxruntime."""
    model = build("helium")
    assert model.config.rms_norm_eps == 1e-8 and model.model.embed_tokens.padding_idx == 0
    step = DecodeStep(copy.deepcopy(model), gsa_config(model))
    path = tmp_path / "helium.onnx"
    export_decode_step(step, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, _ = prompt()
    ids[:, 10] = model.config.pad_token_id  # a zero embedding row inside the prompt
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(ids.shape[1]),
                                                                                             (ids.shape[0], 1))}
    feeds.update(zip(step.past_names(), (t.numpy() for t in step.empty_past(ids.shape[0]))))
    logits = session.run(["logits"], feeds)[0]
    expected = torch_runner(step)(feeds)[0]
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_jetmoe_keys_tiled_over_the_cached_heads_decode_sparse_like_pytorch(tmp_path):
    """JetMoE repeats its cached KV heads (key head j is cached head j % Hkv) before attention:
    the step attends the cached heads, whose codes it carries, as the HF route does."""
    model = build("jetmoe")
    config = gsa_config(model)
    ids, mask = prompt()
    expected, sparse_calls = generated_by_pytorch(model, config, ids, mask)
    assert sparse_calls > 0
    tokens, proto = generated_by_onnxruntime(model, config, tmp_path / "jetmoe.onnx", ids, mask)
    assert any(node.domain == DOMAIN and node.op_type == "Attention" for node in proto.graph.node)
    inputs = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in proto.graph.input}
    assert inputs["past_key_values.0.key_codes"][1] == model.config.num_key_value_heads
    assert tokens.shape == (ids.shape[0], NEW_TOKENS)
    np.testing.assert_array_equal(tokens, expected)


def test_minimax_own_cache_class_is_refused_naming_it(tmp_path):
    """MiniMax builds a MiniMaxCache (linear-attention state beside the attention layers' keys
    and values) and refuses any other: the step, which rebuilds a DynamicCache from the past
    tensors, refuses it before tracing."""
    model = build("minimax")
    with pytest.raises(gsa_compile.GSAError, match=r"MiniMaxForCausalLM: the model keeps its cache in a MiniMaxCache, "
                                                   r"which keeps state other than growing keys and values "
                                                   r"\(linear_cache\); the ONNX decode step carries a DynamicCache"):
        gsa_compile.export_onnx(model, (torch.zeros(2, 4, dtype=torch.long),), str(tmp_path / "m.onnx"),
                                config=gsa_config(model))
    assert getattr(model, "gsa_runtime", None) is None  # export_onnx leaves the model as given
