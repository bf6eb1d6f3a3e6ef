"""Causal LMs of ten architectures exported with gsa_compile.export_onnx(model, (ids,)): a
16-step greedy loop in onnxruntime (prefill included, present fed back as past, one row
left-padded) gives the tokens of the PyTorch GSA model, and the sparse path ran in both."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx_architectures import NEW_TOKENS, build, generated_by_pytorch, gsa_config, prompt

import gsa_compile
from gsa_compile.onnx import DOMAIN, DecodeStep, greedy_decode, onnx_runner

# Llama-style, MHA and parallel-residual (GPT-2, GPT-NeoX), softcap and eager attention (Gemma 2),
# sliding-window layers beside full ones (Gemma 3), MLA with mixture of experts (DeepSeek-V3),
# q/k norms after the projections (OLMo 2), fused qkv (Phi-3), scaled residuals (Granite).
SAMPLE = ["olmo2", "mistral", "qwen2", "phi3", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "deepseek_v3", "granite"]


@pytest.mark.parametrize("model_type", SAMPLE)
def test_onnx_greedy_decode_gives_the_pytorch_gsa_models_tokens(model_type, tmp_path):
    model = build(model_type)
    config = gsa_config(model)
    ids, mask = prompt()
    expected, sparse_calls = generated_by_pytorch(model, config, ids, mask)
    assert sparse_calls > 0

    path = tmp_path / f"{model_type}.onnx"
    proto = gsa_compile.export_onnx(model, (torch.from_numpy(ids[:, :8]),), str(path), config=config)
    assert getattr(model, "gsa_runtime", None) is None  # export_onnx leaves the model as given
    assert any(node.domain == DOMAIN and node.op_type == "Attention" for node in proto.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    step = DecodeStep(model, config)
    tokens = greedy_decode(onnx_runner(session, step), step, ids, NEW_TOKENS, attention_mask=mask)
    np.testing.assert_array_equal(tokens, expected)


def test_export_takes_a_strided_example(tmp_path):
    # ids[:, :8] of a longer batch is a strided view: the export traces a contiguous copy.
    model = build("qwen2")
    wide = torch.randint(3, model.config.vocab_size, (2, 400))
    example = wide[:, :8]
    assert not example.is_contiguous()
    proto = gsa_compile.export_onnx(model, (example,), str(tmp_path / "step.onnx"), config=gsa_config(model))
    assert any(node.domain == DOMAIN and node.op_type == "Attention" for node in proto.graph.node)
