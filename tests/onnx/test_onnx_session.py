"""gsa_compile.onnx.session: the gsa selection runs this project's CPU kernel inside
onnxruntime (through onnxruntime-extensions), and agrees with the model-local functions that
stock onnxruntime runs, on single nodes and on a whole decode step."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx_test_helpers import GSANode, additive, site_attrs

import gsa_compile
from gsa_compile import functional as F
from gsa_compile.onnx import runtime

pytest.importorskip("onnxruntime_extensions", reason="the custom kernels need gsa-compile[onnx-fast] "
                                                     "(onnxruntime-extensions)")

KV_HEADS, GROUPS, DIM, BITS, CHUNK = 2, 3, 16, 32, 8


def _inputs(batch, keys, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, KV_HEADS * GROUPS, 1, DIM, generator=gen)
    key = torch.randn(batch, KV_HEADS, keys, DIM, generator=gen)
    value = torch.randn(batch, KV_HEADS, keys, DIM, generator=gen)
    weight = F.hash_weights(KV_HEADS, DIM, BITS, seed=seed)
    valid = torch.rand(batch, keys, generator=gen) > 0.2
    return dict(query=query, key=key, value=value, key_codes=F.encode(key, weight), weight=weight,
                attn_mask=additive(valid[:, None, None, :]), key_norms=torch.ones(1, 1, 1))


def _sessions(node: GSANode):
    stock = node.session
    fast = gsa_compile.onnx.session(node.model.SerializeToString())
    return stock, fast


@pytest.mark.parametrize("repre,scope", [("max", "per_head"), ("sum", "shared"), ("min", "per_head")])
def test_an_attention_node_runs_the_cpu_kernel_and_agrees_with_the_function(repre, scope):
    example = {name: t.numpy() for name, t in _inputs(2, 200).items()}
    node = GSANode("Attention", example, repre=repre, scope=scope,
                   **site_attrs(chunk_size=CHUNK, top_k_ratio=0.3, scale=DIM ** -0.5, seq_len_threshold=16))
    stock, fast = _sessions(node)
    for batch, keys in ((2, 200), (3, 77), (1, 513)):
        inputs = {name: t.numpy() for name, t in _inputs(batch, keys, seed=keys).items()}
        before = runtime.calls["SelectTopBlocks"]
        out, blocks = fast.run(None, inputs)
        assert runtime.calls["SelectTopBlocks"] == before + 1
        expected_out, expected_blocks = stock.run(None, inputs)
        np.testing.assert_array_equal(blocks, expected_blocks)
        np.testing.assert_allclose(out, expected_out, atol=1e-5)


def test_a_select_blocks_node_runs_the_cpu_kernel_and_agrees_with_the_function():
    inputs = _inputs(2, 150)
    feeds = {"query": inputs["query"].numpy(), "key_codes": inputs["key_codes"].numpy(),
             "weight": inputs["weight"].numpy(), "valid": (inputs["attn_mask"][:, 0, 0] == 0).numpy(),
             "key_norms": torch.rand(2, KV_HEADS, 150).numpy()}
    node = GSANode("SelectBlocks", feeds, chunk_size=CHUNK, num_blocks=25, must_select=[0, -1], repre="max",
                   scope="per_head")
    stock, fast = _sessions(node)
    before = runtime.calls["SelectTopBlocks"]
    np.testing.assert_array_equal(fast.run(None, feeds)[0], stock.run(None, feeds)[0])
    assert runtime.calls["SelectTopBlocks"] == before + 1


def test_without_onnxruntime_extensions_the_session_says_what_to_install(monkeypatch):
    monkeypatch.setattr(runtime, "availability", lambda: "onnxruntime-extensions is not installed")
    monkeypatch.setattr(runtime, "_REGISTERED", [])
    with pytest.raises(gsa_compile.GSABackendUnavailable, match="onnxruntime-extensions is not installed"):
        runtime.session(b"")


def test_the_stock_runtime_still_runs_the_file():
    """The file needs nothing the session adds: stock onnxruntime loads it as it is."""
    example = {name: t.numpy() for name, t in _inputs(1, 64).items()}
    node = GSANode("Attention", example, repre="max", scope="per_head",
                   **site_attrs(chunk_size=CHUNK, budget_tokens=16, scale=DIM ** -0.5))
    session = ort.InferenceSession(node.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, example)[0].shape == (1, KV_HEADS * GROUPS, 1, DIM)
