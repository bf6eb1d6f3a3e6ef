"""The gsa reference functions in onnxruntime against the PyTorch gsa ops (docs/semantics.md),
one node at a time, with dynamic batch and cache length (one session serves every shape)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from onnx_test_helpers import IR_VERSION, GSANode, additive, site_attrs

from gsa_compile import functional as F
from gsa_compile import ops

KV_HEADS, GROUPS, DIM, BITS = 2, 3, 16, 32
CHUNK = 4


def _weight(seed=0):
    return F.hash_weights(KV_HEADS, DIM, BITS, seed=seed)


def _qkv(gen, batch, keys, queries=1):
    query = torch.randn(batch, KV_HEADS * GROUPS, queries, DIM, generator=gen)
    key = torch.randn(batch, KV_HEADS, keys, DIM, generator=gen)
    value = torch.randn(batch, KV_HEADS, keys, DIM + 4, generator=gen)
    return query, key, value


def _valid(gen, batch, keys, empty_block=True):
    valid = torch.rand(batch, keys, generator=gen) > 0.3
    if empty_block and keys > 2 * CHUNK:
        valid[0, CHUNK:2 * CHUNK] = False  # block 1 of row 0 has no valid token: never selected
    return valid


def test_onnx_topk_breaks_ties_to_the_lower_index():
    """The selection relies on it (docs/semantics.md, rule 6); checked on integer scores full of ties."""
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], largest=1, sorted=1)
    graph = helper.make_graph(
        [node], "topk",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [None, None]),
         helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("values", onnx.TensorProto.DOUBLE, [None, None]),
         helper.make_tensor_value_info("indices", onnx.TensorProto.INT64, [None, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(0)
    for n in (5, 64, 1000):
        scores = rng.integers(-2, 3, size=(4, n)).astype(np.float64)
        scores[:, rng.integers(0, n, 3)] = np.inf
        for k in sorted({1, n // 3 + 1, n}):
            indices = session.run(None, {"x": scores, "k": np.array([k])})[1]
            expected = torch.sort(torch.from_numpy(scores), dim=-1, descending=True, stable=True).indices[:, :k]
            np.testing.assert_array_equal(indices, expected.numpy())


def test_encode_matches_the_op_for_query_and_key_heads():
    gen = torch.Generator().manual_seed(1)
    weight = _weight()
    node = GSANode("Encode", {"x": np.zeros((1, 1, 1, 1), np.float32), "weight": weight.numpy()})
    for batch, heads, length in ((1, KV_HEADS, 9), (3, KV_HEADS * GROUPS, 1), (2, KV_HEADS, 33)):
        x = torch.randn(batch, heads, length, DIM, generator=gen)
        (codes,) = node(x=x, weight=weight)
        assert codes.dtype == np.uint8
        np.testing.assert_array_equal(codes, ops.encode(x, weight).numpy())


@pytest.mark.parametrize("repre", ["max", "min", "sum"])
@pytest.mark.parametrize("scope", ["per_head", "shared"])
def test_select_blocks_matches_the_op(repre, scope):
    gen = torch.Generator().manual_seed(2)
    weight = _weight()
    example = {
        "query": np.zeros((1, 1, 1, 1), np.float32), "key_codes": np.zeros((1, 1, 1, 1), np.uint8),
        "weight": weight.numpy(), "valid": np.zeros((1, 1), np.bool_), "key_norms": np.zeros((1, 1, 1), np.float32),
    }
    cases = [  # (batch, keys, num_blocks, must_select, weighted by key norms)
        (2, 37, 4, [0, -2, -1], False),
        (3, 64, 5, [], True),
        (1, 23, 9, [0, 0, -1, 40, -40], False),  # duplicates and blocks outside the cache; k > n
    ]
    for batch, keys, num_blocks, must, weighted in cases:
        node = GSANode("SelectBlocks", example, chunk_size=CHUNK, num_blocks=num_blocks,
                       must_select=helper.make_attribute("must_select", must, attr_type=onnx.AttributeProto.INTS),
                       repre=repre, scope=scope)
        query, key, _ = _qkv(gen, batch, keys)
        codes = ops.encode(key, weight)
        valid = _valid(gen, batch, keys)
        norms = F.key_norms(key) if weighted else None
        expected = ops.select_blocks(query, codes, weight, valid, norms, CHUNK, num_blocks, must, repre, scope)
        (blocks,) = node(query=query, key_codes=codes, weight=weight, valid=valid,
                         key_norms=norms if weighted else np.ones((1, 1, 1), np.float32))
        np.testing.assert_array_equal(blocks, expected.numpy())


def test_sparse_attention_matches_the_op_with_bias_softcap_and_padding_slots():
    gen = torch.Generator().manual_seed(3)
    example = {name: np.zeros((1,) * rank, dtype) for name, rank, dtype in (
        ("query", 4, np.float32), ("key", 4, np.float32), ("value", 4, np.float32), ("blocks", 3, np.int32),
        ("valid", 2, np.bool_), ("attn_bias", 4, np.float32))}
    node = GSANode("SparseAttention", example, chunk_size=CHUNK, scale=0.3, softcap=2.5)
    for batch, keys in ((2, 30), (1, 13)):
        query, key, value = _qkv(gen, batch, keys)
        n_blocks = -(-keys // CHUNK)
        blocks = torch.stack([torch.randperm(n_blocks, generator=gen)[:3] for _ in range(batch * KV_HEADS)])
        blocks = torch.sort(blocks.view(batch, KV_HEADS, 3).to(torch.int32), dim=-1).values
        blocks[0, 0, -1] = -1  # a padding slot
        blocks[-1, -1, -1] = n_blocks - 1  # the partial last block
        valid = _valid(gen, batch, keys, empty_block=False)
        bias = torch.randn(batch, KV_HEADS * GROUPS, 1, keys, generator=gen)
        expected = ops.sparse_attention(query, key, value, blocks, valid, bias, CHUNK, 0.3, 2.5)
        (out,) = node(query=query, key=key, value=value, blocks=blocks, valid=valid, attn_bias=bias)
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


def _attention_node(op="Attention", **attrs):
    names = {"Attention": ("query", "key", "value", "key_codes", "weight", "attn_mask", "key_norms"),
             "ReuseAttention": ("query", "key", "value", "attn_mask", "reuse_blocks")}[op]
    dtypes = {"key_codes": np.uint8, "reuse_blocks": np.int32}
    ranks = {"weight": 3, "key_norms": 3, "reuse_blocks": 3}
    example = {name: np.zeros((1,) * ranks.get(name, 4), dtypes.get(name, np.float32)) for name in names}
    selection = {"repre": "max", "scope": "per_head"} if op == "Attention" else {}
    return GSANode(op, example, **site_attrs(**attrs), **selection)


SITE_CASES = [
    # (what, batch, keys, queries, mask kind, site attributes)
    ("decode by ratio", 2, 45, 1, "padding", dict(top_k_ratio=0.3)),
    ("decode by token budget", 3, 64, 1, None, dict(budget_tokens=10, must_select=(0, -1))),
    ("decode, one block", 1, 3, 1, None, dict(top_k_ratio=0.5)),
    ("prefill runs dense", 2, 20, 20, "causal", dict(top_k_ratio=0.3)),
    ("is_causal prefill", 1, 12, 12, None, dict(top_k_ratio=0.3, is_causal=True)),
    ("short cache runs dense", 2, 30, 1, None, dict(top_k_ratio=0.3, seq_len_threshold=31)),
    ("too few long rows run dense", 2, 30, 1, "padding", dict(top_k_ratio=0.3, seq_len_threshold=25, concurrency_threshold=2)),
    ("softcap", 2, 33, 1, "padding", dict(top_k_ratio=0.5, softcap=3.0)),
]


@pytest.mark.parametrize("what,batch,keys,queries,mask_kind,attrs", SITE_CASES, ids=[c[0] for c in SITE_CASES])
def test_attention_matches_the_op(what, batch, keys, queries, mask_kind, attrs):
    gen = torch.Generator().manual_seed(4)
    weight = _weight()
    node = _attention_node(chunk_size=CHUNK, scale=0.25, **attrs)
    query, key, value = _qkv(gen, batch, keys, queries)
    codes = ops.encode(key, weight)
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(batch, 1, queries, keys, dtype=torch.bool)
        mask[-1, ..., : keys // 3] = False
    elif mask_kind == "causal":
        mask = torch.ones(queries, keys, dtype=torch.bool).tril()[None, None].expand(batch, 1, queries, keys)
    out, blocks = ops.attention(
        query, key, value, codes, weight, mask, None, None, attrs.get("is_causal", False), 0.25, attrs.get("softcap"),
        CHUNK, attrs.get("top_k_ratio"), attrs.get("budget_tokens"), list(attrs.get("must_select", (0, -2, -1))),
        "max", "per_head", attrs.get("seq_len_threshold", 0), attrs.get("concurrency_threshold", 0),
    )
    got_out, got_blocks = node(
        query=query, key=key, value=value, key_codes=codes, weight=weight,
        attn_mask=np.zeros((1, 1, 1, 1), np.float32) if mask is None else additive(mask),
        key_norms=np.ones((1, 1, 1), np.float32),
    )
    np.testing.assert_array_equal(got_blocks, blocks.numpy())
    np.testing.assert_allclose(got_out, out.numpy(), atol=1e-5)


def test_attention_with_every_block_selected_equals_dense_attention():
    gen = torch.Generator().manual_seed(5)
    weight = _weight()
    node = _attention_node(chunk_size=CHUNK, scale=DIM ** -0.5, top_k_ratio=1.0)
    query, key, value = _qkv(gen, 2, 50)
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    out, blocks = node(query=query, key=key, value=value, key_codes=ops.encode(key, weight), weight=weight,
                       attn_mask=np.zeros((1, 1, 1, 1), np.float32), key_norms=np.ones((1, 1, 1), np.float32))
    assert (blocks >= 0).all()
    np.testing.assert_allclose(out, dense.numpy(), atol=1e-5)


def test_reuse_attention_attends_the_first_k_reused_blocks():
    gen = torch.Generator().manual_seed(6)
    weight = _weight()
    node = _attention_node("ReuseAttention", chunk_size=CHUNK, scale=0.25, top_k_ratio=0.3)
    query, key, value = _qkv(gen, 2, 41)
    codes = ops.encode(key, weight)
    _, source_blocks = ops.attention(query, key, value, codes, weight, None, None, None, False, 0.25, None,
                                     CHUNK, 0.5, None, [0, -2, -1], "max", "per_head", 0, 0)
    out, blocks = ops.attention(query, key, value, codes, weight, None, None, source_blocks, False, 0.25, None,
                                CHUNK, 0.3, None, [0, -2, -1], "max", "per_head", 0, 0)
    got_out, got_blocks = node(query=query, key=key, value=value, attn_mask=np.zeros((1, 1, 1, 1), np.float32),
                               reuse_blocks=source_blocks)
    np.testing.assert_array_equal(got_blocks, blocks.numpy())
    np.testing.assert_allclose(got_out, out.numpy(), atol=1e-5)
