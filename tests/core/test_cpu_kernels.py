"""CPU kernels against the reference, and the op-level guarantees of docs/semantics.md."""

import itertools
import math

import pytest
import torch

import gsa_compile
from gsa_compile import functional as F
from gsa_compile.kernels import choose_kernel, cpu, reference
from gsa_compile.kernels.cpu import native

GQA = [1, 2, 4, 8]
HEAD_DIMS = [64, 128, 256]
BITS = [64, 128, 256]
CHUNKS = [16, 64, 128]
# A spread of combinations covering every value of every axis (not the full product).
GRID = [
    (g, d, r, c, b)
    for (g, d, r, c), b in zip(
        itertools.islice(itertools.product(GQA, HEAD_DIMS, BITS, CHUNKS), 0, None, 7), itertools.cycle([1, 2, 3])
    )
]


def make_inputs(batch, groups, dim, bits, chunk, seed, kv_heads=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = 3 * chunk + chunk // 2 + 1  # a partial last block
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    value = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    valid = torch.ones(batch, keys, dtype=torch.bool)
    for row in range(1, batch):  # left padding of different lengths, as in batched generate()
        valid[row, : row * (chunk // 2 + 3)] = False
    weight = F.hash_weights(kv_heads, dim, bits, seed=seed)
    return query, key, value, valid, weight


def test_grid_covers_every_axis():
    for axis, values in enumerate((GQA, HEAD_DIMS, BITS, CHUNKS)):
        assert {case[axis] for case in GRID} == set(values)


@pytest.mark.parametrize("groups,dim,bits,chunk,batch", GRID)
def test_cpu_select_and_attention_match_reference(groups, dim, bits, chunk, batch):
    query, key, value, valid, weight = make_inputs(batch, groups, dim, bits, chunk, seed=groups * dim + bits + chunk)
    codes = F.encode(key, weight)
    assert torch.equal(codes, reference.encode(key, weight))
    n_blocks = math.ceil(key.shape[2] / chunk)
    for k, repre in ((3, "max"), (4, "min"), (n_blocks, "sum")):
        args = (query, codes, weight, valid, None, chunk, k, [0, -2, -1], repre, "per_head")
        got = cpu.select_blocks(*args)
        assert torch.equal(got, reference.select_blocks(*args))
        out = cpu.sparse_attention(query, key, value, got, valid, None, chunk, None, None)
        expected = reference.sparse_attention(query, key, value, got, valid, None, chunk, None, None)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cpu_kernels_serve_cpu_tensors():
    query, key, value, valid, weight = make_inputs(1, 2, 64, 64, 16, seed=0)
    codes = F.encode(key, weight)
    select_args = (query, codes, weight, valid, None, 16, 3, [0, -1], "max", "per_head")
    assert choose_kernel("select_blocks", "cpu", *select_args).backend == "cpu"
    assert choose_kernel("sparse_attention", "cpu").backend == "cpu"


@pytest.mark.parametrize("groups", GQA)
def test_all_blocks_equals_dense_sdpa(groups):
    query, key, value, _, weight = make_inputs(2, groups, 64, 128, 16, seed=groups, dtype=torch.float64)
    out = F.gsa_attention(query, key, value, weight, chunk_size=16, top_k_ratio=1.0)
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_all_blocks_with_padding_mask_equals_dense_sdpa():
    query, key, value, valid, weight = make_inputs(3, 4, 64, 64, 16, seed=9, dtype=torch.float64)
    additive = torch.zeros(3, 1, 1, key.shape[2], dtype=torch.float64).masked_fill(~valid[:, None, None], -torch.inf)
    for mask in (valid[:, None, None, :], additive):
        out = F.gsa_attention(query, key, value, weight, chunk_size=16, top_k_ratio=1.0, attn_mask=mask)
        dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_small_budget_differs_from_dense_and_keeps_must_select():
    query, key, value, valid, weight = make_inputs(2, 4, 64, 128, 16, seed=2)
    key = torch.cat([key] * 4, dim=2)
    value = torch.cat([value] * 4, dim=2)
    valid = torch.cat([valid] * 4, dim=1)
    out, blocks = F.gsa_attention(query, key, value, weight, chunk_size=16, budget_tokens=64,
                                  attn_mask=valid[:, None, None, :], return_blocks=True)
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=valid[:, None, None, :],
                                                             enable_gqa=True)
    assert (out - dense).abs().max() > 1e-3
    n_blocks = math.ceil(key.shape[2] / 16)
    assert blocks.shape == (2, 2, n_blocks)
    for row in blocks.reshape(-1, n_blocks).tolist():
        chosen = [c for c in row if c >= 0]
        assert len(chosen) == 4 and chosen == sorted(chosen)
        assert {n_blocks - 2, n_blocks - 1} <= set(chosen)
    # row 0 is unpadded, so block 0 is valid there and must be selected
    assert (blocks[0, :, 0] == 0).all()


def test_must_select_skips_blocks_without_valid_tokens():
    query, key, value, valid, weight = make_inputs(1, 2, 64, 64, 16, seed=4)
    valid[0, :16] = False  # block 0 fully masked
    codes = F.encode(key, weight)
    blocks = F.select_blocks(query, codes, weight, chunk_size=16, num_blocks=3, valid=valid)
    assert (blocks != 0).all()


def test_ties_go_to_the_lower_block_index():
    # Identical keys in every block: all blocks tie; the lowest non-forced ones must win.
    query, key, value, _, weight = make_inputs(1, 2, 64, 64, 16, seed=5)
    key = key[:, :, :16].repeat(1, 1, 8, 1)
    codes = F.encode(key, weight)
    for kernel in (reference.select_blocks, cpu.select_blocks):
        blocks = kernel(query, codes, weight, None, None, 16, 4, [-1], "max", "per_head")
        assert blocks.tolist() == [[[0, 1, 2, 7]] * 2]


def test_fewer_valid_blocks_than_k_pads_with_minus_one():
    query, key, value, valid, weight = make_inputs(1, 2, 64, 64, 16, seed=6)
    valid[:] = False
    valid[0, 20:30] = True  # only block 1 has valid tokens
    blocks = F.select_blocks(query, F.encode(key, weight), weight, chunk_size=16, num_blocks=3, valid=valid)
    assert blocks.tolist() == [[[1, -1, -1]] * 2]


def test_reuse_blocks_are_used_verbatim():
    query, key, value, _, weight = make_inputs(1, 2, 64, 64, 16, seed=7)
    forced = torch.tensor([[[1, 3, -1, -1], [0, 2, -1, -1]]], dtype=torch.int32)
    out = F.gsa_attention(query, key, value, weight, chunk_size=16, budget_tokens=32, must_select=(),
                          reuse_blocks=forced)
    expected = F.sparse_attention(query, key, value, forced[..., :2], chunk_size=16)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda q, k, v, w: (q.int(), k, v, w), "query must be float16"),
        (lambda q, k, v, w: (q[:, :3], k, v, w), "multiple of KV heads"),
        (lambda q, k, v, w: (q, k[..., :32], v, w[:, :32]), "head dim"),
        (lambda q, k, v, w: (q, k, v[:, :, :5], w), "must agree on heads and length"),
        (lambda q, k, v, w: (q, k, v, w[..., :12]), "multiple of 8"),
        (lambda q, k, v, w: (q, k.double(), v, w), "share a dtype"),
        (lambda q, k, v, w: (q, k, v, w[:1]), "KV heads"),
    ],
)
def test_bad_tensors_raise_clear_errors(mutate, message):
    query, key, value, _, weight = make_inputs(1, 2, 64, 64, 16, seed=8)
    query, key, value, weight = mutate(query, key, value, weight)
    with pytest.raises(gsa_compile.GSAInputError, match=message):
        F.gsa_attention(query, key, value, weight, chunk_size=16, budget_tokens=32,
                        key_codes=torch.zeros(key.shape[0], key.shape[1], key.shape[2], weight.shape[-1] // 8,
                                              dtype=torch.uint8))


def test_select_errors_name_the_argument():
    query, key, value, valid, weight = make_inputs(1, 2, 64, 64, 16, seed=8)
    codes = F.encode(key, weight)
    with pytest.raises(gsa_compile.GSAInputError, match="must-select"):
        F.select_blocks(query, codes, weight, chunk_size=16, num_blocks=1)
    with pytest.raises(gsa_compile.GSAInputError, match="repre must be one of"):
        F.select_blocks(query, codes, weight, chunk_size=16, num_blocks=4, repre="mean")
    with pytest.raises(gsa_compile.GSAInputError, match="key_codes must be uint8"):
        F.select_blocks(query, codes.int(), weight, chunk_size=16, num_blocks=4)
    with pytest.raises(gsa_compile.GSAInputError, match="valid must be"):
        F.select_blocks(query, codes, weight, chunk_size=16, num_blocks=4, valid=valid[:, :-1])
    with pytest.raises(gsa_compile.GSAInputError, match="one query token"):
        F.select_blocks(query.expand(-1, -1, 2, -1), codes, weight, chunk_size=16, num_blocks=4)
    with pytest.raises(gsa_compile.GSAInputError, match="exactly one of top_k_ratio and budget_tokens"):
        F.gsa_attention(query, key, value, weight, chunk_size=16)


def test_row_without_a_valid_selected_token_returns_zeros():
    query, key, value, valid, weight = make_inputs(2, 2, 64, 64, 16, seed=10)
    valid[1] = False
    blocks = torch.tensor([[[0, 1], [1, 2]], [[0, 1], [1, 2]]], dtype=torch.int32)
    for kernel in (reference.sparse_attention, cpu.sparse_attention):
        out = kernel(query, key, value, blocks, valid, None, 16, None, None)
        assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("groups, bits", [(1, 24), (2, 64), (3, 136), (4, 128), (6, 24), (8, 512), (16, 128)])
def test_plane_similarity_is_the_reference_integer_for_every_group(groups, bits, compiled, monkeypatch):
    if compiled:
        assert native.available(), "the C compiler builds the CPU kernels' popcount loop here"
    else:
        monkeypatch.setattr(native, "_library", lambda: None)
    query, key, _, _, weight = make_inputs(2, groups, 32, bits, 8, seed=30 + groups)
    codes = F.encode(key, weight)
    # A slice of a longer cache, as a static cache's filled part: strided, read in place.
    sliced = F.encode(torch.cat([key[:, :, :5], key, key[:, :, :3]], dim=2), weight)[:, :, 5:-3]
    assert not sliced.is_contiguous()
    expected = reference.token_similarity(query, codes, weight)
    for got in (cpu.token_similarity(query, codes, weight), cpu.token_similarity(query, sliced, weight)):
        assert got.dtype == torch.float64
        assert torch.equal(got, expected)


@pytest.mark.parametrize("repre", ["max", "sum"])
def test_cpu_limit_masked_tail_and_norm_means_match_reference(repre):
    query, key, _, valid, weight = make_inputs(3, 4, 64, 64, 8, seed=31)
    valid[1, 20:] = False  # a static cache's unused tail
    valid[2] = False
    valid[2, :5] = True  # one partial block: blocks 0, -2 and -1 are all block 0
    codes = F.encode(key, weight)
    limit = torch.tensor([6, 3, 1], dtype=torch.int32)
    for norms in (None, F.key_norms(key)):  # float64 norm products and means, as the reference
        for scope in ("per_head", "shared"):
            args = (query, codes, weight, valid, norms, 8, 6, [0, -2, -1], repre, scope, limit)
            assert torch.equal(cpu.select_blocks(*args), reference.select_blocks(*args))
    blocks = cpu.select_blocks(query, codes, weight, valid, None, 8, 6, [0, -2, -1], repre, "per_head", limit)
    assert blocks[1].tolist() == [[0, 1, 2, -1, -1, -1]] * 2  # 20 keys: blocks 0, 1 (= -2), 2 (= -1)
    assert blocks[2].tolist() == [[0, -1, -1, -1, -1, -1]] * 2


@pytest.mark.parametrize("case", ["plain", "valid", "shared_bias", "head_bias", "sinks", "masked_row", "nan_query"])
def test_compiled_attention_equals_the_gathered_sdpa_path(case, monkeypatch):
    # The compiled online-softmax loop (float32, one query token) against the torch path it
    # replaces (gather the selected tokens, one SDPA), on a strided slice of a longer cache.
    assert native.available(), "the C compiler builds the CPU kernels' attention loop here"
    query, key, value, valid, weight = make_inputs(3, 4, 64, 64, 16, seed=7)
    key, value = (torch.cat([x, x[:, :, :5]], dim=2)[:, :, :-5] for x in (key, value))
    blocks = cpu.select_blocks(query, F.encode(key, weight), weight, valid, None, 16, 3, [0, -1], "max", "per_head")
    blocks[0, 1, -1] = -1  # a KV head with fewer selected blocks
    bias, sinks = None, None
    kept = valid if case in ("valid", "masked_row", "shared_bias") else None
    if case == "shared_bias":
        bias = torch.randn(3, 1, 1, key.shape[2])
    if case == "head_bias":
        bias = torch.randn(3, query.shape[1], 1, key.shape[2])
        bias[1, 2, 0, :] = float("-inf")  # one head attends nothing: zeros
    if case == "sinks":
        sinks = torch.randn(query.shape[1])
    if case == "masked_row":
        kept = kept.clone()
        kept[2] = False
    if case == "nan_query":
        query = query.clone()
        query[1, 3] = float("nan")
    compiled = cpu.sparse_attention(query, key, value, blocks, kept, bias, 16, None, None, sinks)
    monkeypatch.setattr(native, "_library", lambda: None)
    gathered = cpu.sparse_attention(query, key, value, blocks, kept, bias, 16, None, None, sinks)
    torch.testing.assert_close(compiled, gathered, rtol=1e-5, atol=1e-6, equal_nan=True)
    if case == "nan_query":
        assert compiled[1, 3].isnan().all() and not compiled[1, 2].isnan().any()
