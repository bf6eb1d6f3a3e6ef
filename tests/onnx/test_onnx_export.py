"""export_onnx on a hand-written attention block that calls the functional API with a codes
cache: the ONNX graph, its checker, and onnxruntime against PyTorch on dynamic shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import gsa_compile
from gsa_compile import GSAError
from gsa_compile import functional as F
from gsa_compile.onnx import DOMAIN, OPSET_VERSION

HEADS, KV_HEADS, DIM, WIDTH = 4, 2, 16, 64


class CachedGSABlock(nn.Module):
    """One attention layer over an explicit cache: keys, values and their codes in, present out."""

    def __init__(self, **site):
        super().__init__()
        self.q = nn.Linear(WIDTH, HEADS * DIM)
        self.kv = nn.Linear(WIDTH, 2 * KV_HEADS * DIM)
        self.out = nn.Linear(HEADS * DIM, WIDTH)
        self.register_buffer("hash_weight", F.hash_weights(KV_HEADS, DIM, 32, seed=3))
        self.site = site

    def forward(self, x, past_key, past_value, past_codes, mask):
        batch, steps, _ = x.shape
        query = self.q(x).view(batch, steps, HEADS, DIM).transpose(1, 2)
        key, value = self.kv(x).view(batch, steps, 2, KV_HEADS, DIM).permute(2, 0, 3, 1, 4)
        keys = torch.cat([past_key, key], dim=2)
        values = torch.cat([past_value, value], dim=2)
        codes = torch.cat([past_codes, F.encode(key, self.hash_weight)], dim=2)
        attended = F.gsa_attention(query, keys, values, self.hash_weight, key_codes=codes, attn_mask=mask, **self.site)
        return self.out(attended.transpose(1, 2).reshape(batch, steps, -1)), keys, values, codes


SITE = dict(chunk_size=4, top_k_ratio=0.3, must_select=(0, -1), repre="sum", seq_len_threshold=16)
NAMES = ["x", "past_key", "past_value", "past_codes", "mask"]


def _inputs(gen, batch, past, steps=1, padded=True):
    mask = torch.ones(batch, 1, steps, past + steps, dtype=torch.bool)
    if padded:
        mask[0, ..., : past // 4] = False  # left padding of row 0
    if steps > 1:
        mask &= torch.ones(steps, past + steps, dtype=torch.bool).tril(past)
    return (
        torch.randn(batch, steps, WIDTH, generator=gen),
        torch.randn(batch, KV_HEADS, past, DIM, generator=gen),
        torch.randn(batch, KV_HEADS, past, DIM, generator=gen),
        torch.randint(0, 256, (batch, KV_HEADS, past, 4), generator=gen, dtype=torch.uint8),
        mask,
    )


def _dynamic_shapes():
    # Dim.DYNAMIC lets torch.export relate the mask's length to past + steps itself.
    dynamic = torch.export.Dim.DYNAMIC
    cache = {0: dynamic, 2: dynamic}
    return ({0: dynamic, 1: dynamic}, cache, cache, cache, {0: dynamic, 2: dynamic, 3: dynamic})


def _export(tmp_path, module, name):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad():
        # Two new tokens in the example: a dim of size 1 would be specialized by torch.export.
        proto = gsa_compile.export_onnx(module, _inputs(gen, 2, 20, steps=2), str(path), dynamic_shapes=_dynamic_shapes(),
                                        input_names=NAMES)
    return proto, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    torch.manual_seed(0)
    module = CachedGSABlock(**SITE).eval()
    return (module, *_export(tmp_path_factory.mktemp("onnx"), module, "block"))


def test_every_gsa_site_is_a_gsa_node_with_its_attributes_and_function(sparse_export):
    _, proto, _ = sparse_export
    onnx.checker.check_model(proto, full_check=True)
    gsa_nodes = {node.op_type: node for node in proto.graph.node if node.domain == DOMAIN}
    assert set(gsa_nodes) == {"Encode", "Attention"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gsa_nodes["Attention"].attribute}
    assert attrs["chunk_size"] == 4 and list(attrs["must_select"]) == [0, -1]
    assert attrs["repre"] == b"sum" and attrs["scope"] == b"per_head" and attrs["budget_tokens"] == 0
    assert onnx.numpy_helper.to_array(attrs["top_k_ratio"]) == 0.3
    assert attrs["seq_len_threshold"] == 16 and attrs["scale"] == pytest.approx(DIM ** -0.5)
    # Attention's body calls SelectTopBlocks and SparseAttention (the kernels a runtime may
    # provide): their functions too.
    functions = {(f.domain, f.name) for f in proto.functions}
    assert functions == {(DOMAIN, "Encode"), (DOMAIN, "Attention"), (DOMAIN, "SelectTopBlocks"),
                         (DOMAIN, "SparseAttention")}
    assert any(o.domain == DOMAIN and o.version == OPSET_VERSION for o in proto.opset_import)


@pytest.mark.parametrize("batch,past,steps", [(1, 40, 1), (3, 61, 1), (2, 9, 1), (2, 30, 5)])
def test_onnxruntime_matches_pytorch_on_dynamic_shapes(sparse_export, batch, past, steps):
    module, _, session = sparse_export
    inputs = _inputs(torch.Generator().manual_seed(batch * past), batch, past, steps)
    with torch.no_grad():
        expected = module(*inputs)
    got = session.run(None, {name: t.numpy() for name, t in zip(NAMES, inputs)})
    np.testing.assert_allclose(got[0], expected[0].numpy(), atol=1e-4)
    np.testing.assert_array_equal(got[3], expected[3].numpy())  # codes: only the new key was encoded


def test_with_every_block_in_the_budget_onnx_equals_the_dense_model(tmp_path):
    torch.manual_seed(1)
    module = CachedGSABlock(**{**SITE, "top_k_ratio": 1.0}).eval()
    _, session = _export(tmp_path, module, "full_budget")
    inputs = _inputs(torch.Generator().manual_seed(7), 2, 50)
    x, past_key, past_value, _, mask = inputs
    with torch.no_grad():
        batch = x.shape[0]
        query = module.q(x).view(batch, 1, HEADS, DIM).transpose(1, 2)
        key, value = module.kv(x).view(batch, 1, 2, KV_HEADS, DIM).permute(2, 0, 3, 1, 4)
        dense = torch.nn.functional.scaled_dot_product_attention(
            query, torch.cat([past_key, key], 2), torch.cat([past_value, value], 2), attn_mask=mask, enable_gqa=True
        )
        expected = module.out(dense.transpose(1, 2).reshape(batch, 1, -1))
    got = session.run(None, {name: t.numpy() for name, t in zip(NAMES, inputs)})
    np.testing.assert_allclose(got[0], expected.numpy(), atol=1e-4)


def test_a_module_without_gsa_sites_is_refused_with_the_reason(tmp_path):
    with pytest.raises(GSAError, match="no GSA site"):
        gsa_compile.export_onnx(nn.Linear(4, 4), (torch.randn(2, 4),), str(tmp_path / "linear.onnx"))


def test_a_module_without_gsa_ops_goes_through_the_fx_route(tmp_path):
    from gsa_compile.capture.fx_examples import build_example

    model, _ = build_example("manual")
    config = gsa_compile.GSAConfig(num_hidden_layers=1, head_dim=8, hash_bits=8, chunk_size=2,
                                   top_k_ratio_per_layer=[0.5], cpu_seq_len_threshold=0)
    x = torch.randn(2, 12, 32)
    path = tmp_path / "manual.onnx"
    proto = gsa_compile.export_onnx(model, (x,), str(path), config=config)
    assert {n.op_type for n in proto.graph.node if n.domain == DOMAIN} == {"Encode", "Attention"}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model(x).numpy(), atol=1e-4)  # a prefill: GSA runs dense


def test_a_static_cache_updated_in_place_is_refused_with_the_way_out(tmp_path):
    from gsa_compile.capture.fx_examples import build_example

    model, args = build_example("static_cache")
    config = gsa_compile.GSAConfig(num_hidden_layers=1, head_dim=8, hash_bits=8, chunk_size=4,
                                   top_k_ratio_per_layer=[0.5])
    with pytest.raises(GSAError, match="growing cache"):
        gsa_compile.export_onnx(model, args, str(tmp_path / "static.onnx"), config=config)


def test_a_float16_model_runs_in_onnxruntime_like_pytorch(tmp_path):
    torch.manual_seed(2)
    module = CachedGSABlock(**SITE).eval().half()
    module.hash_weight = module.hash_weight.float()  # hash weights stay float32 (the op contract)

    def half(inputs):
        return tuple(t.half() if t.is_floating_point() else t for t in inputs)

    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "half.onnx"
    with torch.no_grad():
        gsa_compile.export_onnx(module, half(_inputs(gen, 2, 20, steps=2)), str(path),
                                dynamic_shapes=_dynamic_shapes(), input_names=NAMES)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = half(_inputs(gen, 3, 45))
    with torch.no_grad():
        expected = module(*inputs)
    got = session.run(None, {name: t.numpy() for name, t in zip(NAMES, inputs)})
    assert got[0].dtype == np.float16
    np.testing.assert_allclose(got[0].astype(np.float32), expected[0].float().numpy(), atol=2e-3)
    np.testing.assert_array_equal(got[3], expected[3].numpy())


def test_an_additive_float_mask_with_per_head_bias_matches_pytorch(tmp_path):
    """HF-style masks: finfo.min marks masked keys; other values are a bias (here per head)."""
    torch.manual_seed(3)
    module = CachedGSABlock(**SITE).eval()
    gen = torch.Generator().manual_seed(0)

    def float_mask(inputs):
        *tensors, mask = inputs
        bias = -torch.rand(mask.shape[0], HEADS, *mask.shape[2:], generator=gen)
        return (*tensors, bias.masked_fill(~mask, torch.finfo(torch.float32).min))

    path = tmp_path / "float_mask.onnx"
    with torch.no_grad():
        gsa_compile.export_onnx(module, float_mask(_inputs(gen, 2, 20, steps=2)), str(path),
                                dynamic_shapes=_dynamic_shapes(), input_names=NAMES)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, past in ((2, 40), (3, 17)):
        inputs = float_mask(_inputs(gen, batch, past))
        with torch.no_grad():
            expected = module(*inputs)
        got = session.run(None, {name: t.numpy() for name, t in zip(NAMES, inputs)})
        np.testing.assert_allclose(got[0], expected[0].numpy(), atol=1e-4)


def test_a_program_computing_complex_tensors_is_refused_with_the_op_and_module():
    from gsa_compile.onnx.export import refuse_complex

    class Rotary(torch.nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.view_as_complex(x.reshape(2, -1, 2)) * torch.polar(x[:1, 0, :1], x[:1, 0, :1]))

    program = torch.export.export(Rotary(), (torch.randn(2, 3, 4),))
    with pytest.raises(gsa_compile.GSAError, match="complex"):
        refuse_complex(program)
