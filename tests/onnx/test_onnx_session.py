"""gsa_compile.onnx.session: the gsa selection and sparse attention run this project's CPU
kernels inside onnxruntime (registered through its C API, reading its buffers in place), and
agree with the model-local functions that stock onnxruntime runs."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx_test_helpers import GSANode, additive, site_attrs

import gsa_compile
from gsa_compile import functional as F
from gsa_compile.onnx import runtime

if runtime.availability() is not None:
    pytest.skip(f"the gsa kernels cannot be registered here: {runtime.availability()}", allow_module_level=True)

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
        before = dict(runtime.calls)
        out, blocks = fast.run(None, inputs)
        for op in ("SelectTopBlocks", "SparseAttention"):
            assert runtime.calls[op] == before.get(op, 0) + 1
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


def test_where_the_kernels_cannot_be_registered_the_session_says_why(monkeypatch):
    from gsa_compile.onnx import native

    monkeypatch.setattr(runtime, "_LIBRARY", [])
    monkeypatch.setattr(native, "shim_path", lambda: (_ for _ in ()).throw(native.NativeUnavailable("no C compiler")))
    with pytest.raises(gsa_compile.GSABackendUnavailable, match="no C compiler"):
        runtime.session(b"")
    assert "no C compiler" in runtime.availability()


@contextlib.contextmanager
def _kernel_replaced(session_maker, name, run):
    """A session whose gsa.<name> kernels call `run` instead (kernels bind their spec when
    onnxruntime creates them, at session load)."""
    library = runtime._library()
    session = session_maker()
    kernels = dict(library._kernels)
    for handle, (spec, attributes) in kernels.items():
        if spec.name == name:
            library._kernels[handle] = (dataclasses.replace(spec, run=run), attributes)
    try:
        yield session
    finally:
        library._kernels.update(kernels)


def _one_attention_node():
    example = {name: t.numpy() for name, t in _inputs(1, 64).items()}
    node = GSANode("Attention", example, repre="max", scope="per_head",
                   **site_attrs(chunk_size=CHUNK, budget_tokens=16, scale=DIM ** -0.5))
    return example, lambda: gsa_compile.onnx.session(node.model.SerializeToString())


def test_an_error_inside_a_kernel_is_raised_by_run():
    example, make = _one_attention_node()

    def broken(inputs, attributes):
        raise ValueError("kernel bug")

    with _kernel_replaced(make, "SparseAttention", broken) as fast:
        with pytest.raises(runtime.GSAKernelError, match="kernel bug"):
            fast.run(None, example)
        # The next call starts clean.
        with pytest.raises(runtime.GSAKernelError, match="kernel bug"):
            fast.run(None, example)


def test_kernels_read_the_runtimes_buffers_in_place():
    """The views a kernel gets are onnxruntime's input buffers: a fed array reaches it unmoved."""
    example, make = _one_attention_node()
    seen = {}

    def recording(inputs, attributes):
        seen["key"] = inputs[1].data_ptr()
        return runtime.sparse_attention(inputs, attributes)

    with _kernel_replaced(make, "SparseAttention", recording) as fast:
        fast.run(None, example)
    assert seen["key"] == example["key"].ctypes.data


def test_the_stock_runtime_still_runs_the_file():
    """The file needs nothing the session adds: stock onnxruntime loads it as it is."""
    example = {name: t.numpy() for name, t in _inputs(1, 64).items()}
    node = GSANode("Attention", example, repre="max", scope="per_head",
                   **site_attrs(chunk_size=CHUNK, budget_tokens=16, scale=DIM ** -0.5))
    session = ort.InferenceSession(node.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, example)[0].shape == (1, KV_HEADS * GROUPS, 1, DIM)


def test_a_float16_node_runs_the_kernels_and_agrees_with_the_function():
    example = {name: (t.half() if name in ("query", "key", "value", "attn_mask") else t).numpy()
               for name, t in _inputs(2, 96).items()}
    node = GSANode("Attention", example, repre="max", scope="per_head",
                   **site_attrs(chunk_size=CHUNK, budget_tokens=24, scale=DIM ** -0.5))
    stock, fast = _sessions(node)
    before = dict(runtime.calls)
    out, blocks = fast.run(None, example)
    assert runtime.calls["SparseAttention"] == before.get("SparseAttention", 0) + 1
    expected_out, expected_blocks = stock.run(None, example)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(blocks, expected_blocks)
    np.testing.assert_allclose(out.astype(np.float32), expected_out.astype(np.float32), atol=2e-3)


def test_a_bfloat16_model_is_refused_with_what_to_do():
    # onnxruntime's CPU provider has no bfloat16 kernels for most ops (Mul here): the session
    # says so and how to export instead, rather than onnxruntime's bare type error.
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "bf16",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(gsa_compile.GSAError, match="bfloat16.*float32 or float16"):
        gsa_compile.onnx.session(onnx.shape_inference.infer_shapes(model).SerializeToString())
