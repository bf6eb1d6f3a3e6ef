"""The NPU lowering, run through the torch_npu emulation, against the reference kernels."""

import pytest
import torch

from gsa_compile import functional as F
from gsa_compile import kernels, use_backend
from gsa_compile.kernels import reference


def op_names(module):
    return [name for name, _, _ in module.calls]


def random_site(batch, q_heads, kv_heads, keys, dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    value = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    valid = torch.rand(batch, keys, generator=gen) > 0.3
    return query, key, value, valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [64, 128, 72])
def test_encode_matches_reference_bit_for_bit(emulated_npu, dtype, bits):
    _, key, _, _ = random_site(2, 4, 4, 45, 64, seed=bits, dtype=dtype)
    key[0, 1, 3] = 0.0  # projects to exact zeros: bit 1 by both conventions (value >= 0)
    key[1, 2, 7] = -0.0
    weight = F.hash_weights(4, 64, bits, seed=1)
    with use_backend("npu"):
        codes = F.encode(key, weight)
    assert op_names(emulated_npu) == ["npu_sign_bits_pack"]
    assert torch.equal(codes, reference.encode(key, weight))
    assert codes[0, 1, 3].eq(255).all()


def test_encode_of_query_heads_uses_their_kv_heads_weight(emulated_npu):
    query, _, _, _ = random_site(3, 8, 2, 1, 128, seed=5)
    weight = F.hash_weights(2, 128, 128, seed=2)
    with use_backend("npu"):
        codes = F.encode(query, weight)
    assert torch.equal(codes, reference.encode(query, weight))


SELECT_CASES = [
    # batch, q_heads, kv_heads, keys, dim, bits, chunk, k, repre, scope, norms, masked
    (1, 4, 4, 200, 64, 64, 16, 4, "max", "per_head", False, False),
    (2, 8, 2, 301, 128, 128, 32, 3, "max", "per_head", True, True),
    (3, 8, 1, 160, 64, 128, 16, 5, "min", "shared", False, True),
    (2, 16, 2, 257, 128, 72, 64, 3, "sum", "per_head", False, True),
    (2, 6, 3, 96, 64, 64, 16, 6, "sum", "shared", True, False),
    (1, 32, 2, 130, 64, 128, 16, 4, "max", "per_head", False, True),  # G * R = 2048: float16 signs, still exact
    (1, 32, 2, 130, 64, 136, 16, 4, "max", "per_head", False, True),  # G * R > 2048: float32 signs
    (2, 128, 1, 140, 576, 576, 16, 4, "max", "per_head", False, True),  # MLA latent: 128 heads, one latent
]


@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_blocks_matches_reference(emulated_npu, case):
    batch, q_heads, kv_heads, keys, dim, bits, chunk, k, repre, scope, norms, masked = case
    query, key, _, valid = random_site(batch, q_heads, kv_heads, keys, dim, seed=keys)
    valid = valid if masked else None
    weight = F.hash_weights(kv_heads, dim, bits, seed=3)
    codes = reference.encode(key, weight)
    key_norms = F.key_norms(key) if norms else None
    must = [0, -2, -1]
    with use_backend("npu"):
        got = F.select_blocks(query, codes, weight, chunk_size=chunk, num_blocks=k, must_select=must, repre=repre,
                              valid=valid, key_norms=key_norms, scope=scope)
    expected = reference.select_blocks(query, codes, weight, valid, key_norms, chunk, k, must, repre, scope)
    assert "npu_sign_bits_unpack" in op_names(emulated_npu)
    assert torch.equal(got, expected)


def test_similarity_is_exact_when_the_cache_is_scored_in_slices(emulated_npu, monkeypatch):
    from gsa_compile.kernels.npu import select

    query, key, _, _ = random_site(2, 8, 2, 150, 64, seed=11)
    weight = F.hash_weights(2, 64, 64, seed=4)
    codes = reference.encode(key, weight)
    # 4 (row, KV head) pairs * 64 bits * 2 bytes (float16 signs) * 40 tokens: slices of 40 tokens, the last partial.
    monkeypatch.setattr(select, "UNPACKED_SLICE_BYTES", 4 * 64 * 2 * 40)
    got = select.token_similarity(query, codes, weight)
    assert op_names(emulated_npu).count("npu_sign_bits_unpack") == 1 + 4
    torch.testing.assert_close(got.double(), reference.token_similarity(query, codes, weight), rtol=0, atol=0)


def test_float16_signs_hold_the_largest_score_exactly(emulated_npu):
    from gsa_compile.kernels.npu import select

    query, key, _, _ = random_site(1, 32, 2, 64, 64, seed=12)
    query[0, :16, 0] = key[0, 0, 7]  # every query head of KV head 0's group hashes like key 7
    weight = F.hash_weights(2, 64, 128, seed=6)
    codes = reference.encode(key, weight)
    got = select.token_similarity(query, codes, weight)
    assert got[0, 0, 7] == 16 * 128  # G * R = 2048, the float16 path's limit
    assert {args[2] for name, args, _ in emulated_npu.calls if name == "npu_sign_bits_unpack"} == {torch.float16}
    assert torch.equal(got.double(), reference.token_similarity(query, codes, weight))


ATTENTION_CASES = [
    # batch, q_heads, kv_heads, keys, dim, chunk, k, dtype
    (1, 4, 4, 256, 64, 16, 5, torch.float16),  # cache already in pages: no copy
    (2, 8, 2, 300, 128, 32, 4, torch.bfloat16),  # partial last block: selected blocks gathered
    (3, 16, 2, 192, 64, 64, 2, torch.float16),
    (2, 6, 3, 130, 128, 16, 3, torch.bfloat16),
]
TOLERANCE = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def selected_blocks(query, key, valid, chunk, k):
    weight = F.hash_weights(key.shape[1], key.shape[-1], 64, seed=9)
    codes = reference.encode(key, weight)
    return reference.select_blocks(query, codes, weight, valid, None, chunk, k, [0, -1], "max", "per_head")


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_attention_matches_reference(emulated_npu, case, masked):
    batch, q_heads, kv_heads, keys, dim, chunk, k, dtype = case
    query, key, value, valid = random_site(batch, q_heads, kv_heads, keys, dim, seed=keys + k, dtype=dtype)
    valid = valid if masked else None
    blocks = selected_blocks(query, key, valid, chunk, k)
    with use_backend("npu"):
        got = F.sparse_attention(query, key, value, blocks, chunk_size=chunk, valid=valid)
    expected = reference.sparse_attention(query, key, value, blocks, valid, None, chunk, None, None)
    assert op_names(emulated_npu) == ["npu_fused_infer_attention_score"]
    assert got.dtype == dtype and got.shape == (batch, q_heads, 1, dim)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    _, args, kwargs = emulated_npu.calls[0]
    in_place = keys % chunk == 0
    assert (args[1].data_ptr() == key.data_ptr()) == in_place
    assert kwargs["block_table"].shape == (batch * kv_heads, k)


def test_sparse_attention_gathers_from_a_non_contiguous_cache(emulated_npu):
    query, key, value, valid = random_site(2, 8, 2, 128, 64, seed=3, dtype=torch.float16)
    key_bshd, value_bshd = key.transpose(1, 2).contiguous(), value.transpose(1, 2).contiguous()
    key, value = key_bshd.transpose(1, 2), value_bshd.transpose(1, 2)  # a BSHD cache seen as BHSD
    blocks = selected_blocks(query, key, valid, 16, 3)
    with use_backend("npu"):
        got = F.sparse_attention(query, key, value, blocks, chunk_size=16, valid=valid, scale=0.3)
    expected = reference.sparse_attention(query, key, value, blocks, valid, None, 16, 0.3, None)
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float16])


@pytest.mark.parametrize("kind", ["per_head_bool", "additive"])
def test_sparse_attention_with_a_bias_matches_reference(emulated_npu, kind):
    from gsa_compile.kernels.common import split_decode_mask

    batch, q_heads, kv_heads, keys, chunk = 2, 8, 2, 160, 32
    query, key, value, _ = random_site(batch, q_heads, kv_heads, keys, 64, seed=21, dtype=torch.float16)
    gen = torch.Generator().manual_seed(22)
    if kind == "per_head_bool":
        mask = torch.rand(batch, q_heads, 1, keys, generator=gen) > 0.2
        mask[1, 3] = False  # one head of row 1 sees no key at all: zeros, like the reference
    else:
        mask = torch.randn(batch, 1, 1, keys, generator=gen) * 2
        mask[0, ..., 40:90] = torch.finfo(torch.float32).min
    valid, bias = split_decode_mask(mask, batch, q_heads, keys)
    assert bias is not None
    blocks = selected_blocks(query, key, valid, chunk, 3)
    with use_backend("npu"):
        got = F.sparse_attention(query, key, value, blocks, chunk_size=chunk, valid=valid, attn_bias=bias)
    expected = reference.sparse_attention(query, key, value, blocks, valid, bias, chunk, None, None)
    torch.testing.assert_close(got, expected, atol=4e-3, rtol=4e-3)
    if kind == "per_head_bool":
        assert got[1, 3].eq(0).all()


def test_rows_without_any_valid_key_return_zeros(emulated_npu):
    query, key, value, valid = random_site(2, 4, 2, 64, 64, seed=8, dtype=torch.float16)
    valid[1] = False
    blocks = torch.tensor([[[0, 2], [1, 3]], [[-1, -1], [-1, -1]]], dtype=torch.int32)
    with use_backend("npu"):
        got = F.sparse_attention(query, key, value, blocks, chunk_size=16, valid=valid)
    expected = reference.sparse_attention(query, key, value, blocks, valid, None, 16, None, None)
    assert got[1].eq(0).all() and not got.isnan().any()
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float16])


@pytest.mark.parametrize("change, reason", [
    (dict(dtype=torch.float32), "float16 or bfloat16"),
    (dict(softcap=30.0), "softcap"),
    (dict(chunk=8), "multiple of 16"),
    (dict(q_heads=130, kv_heads=2), "> 64"),
])
def test_sparse_attention_declines_what_fia_cannot_do(emulated_npu, change, reason):
    params = dict(dtype=torch.float16, softcap=None, chunk=16, q_heads=4, kv_heads=2)
    params.update(change)
    query, key, value, _ = random_site(1, params["q_heads"], params["kv_heads"], 64, 64, seed=1, dtype=params["dtype"])
    blocks = torch.tensor([[[0, 1]] * params["kv_heads"]], dtype=torch.int32)
    args = (query, key, value, blocks, None, None, params["chunk"], None, params["softcap"])
    with use_backend("npu"):
        kernel = kernels.choose_kernel("sparse_attention", "cpu", *args)
        got = F.sparse_attention(query, key, value, blocks, chunk_size=params["chunk"], softcap=params["softcap"])
    from gsa_compile.kernels.npu import supports_sparse_attention

    assert kernel.backend == "reference" and reason in supports_sparse_attention(*args)
    assert emulated_npu.calls == []
    torch.testing.assert_close(got, reference.sparse_attention(*args))


def test_float64_keeps_the_reference_projection(emulated_npu):
    query, key, _, _ = random_site(1, 4, 2, 32, 64, seed=2, dtype=torch.float64)
    weight = F.hash_weights(2, 64, 64, seed=1).double()
    with use_backend("npu"):
        codes = F.encode(key, weight)
        blocks = F.select_blocks(query, codes, weight, chunk_size=8, num_blocks=3)
    assert emulated_npu.calls == []
    assert torch.equal(codes, reference.encode(key, weight))
    assert torch.equal(blocks, reference.select_blocks(query, codes, weight, None, None, 8, 3, [0, -2, -1],
                                                       "max", "per_head"))


def test_the_gsa_ops_pass_opcheck_when_served_by_the_npu_kernels(emulated_npu):
    query, key, value, valid = random_site(2, 8, 2, 96, 64, seed=4, dtype=torch.float16)
    weight = F.hash_weights(2, 64, 64, seed=1)
    codes = reference.encode(key, weight)
    blocks = selected_blocks(query, key, valid, 16, 3)
    with use_backend("npu"):
        torch.library.opcheck(torch.ops.gsa.encode.default, (key, weight))
        torch.library.opcheck(torch.ops.gsa.select_blocks.default,
                              (query, codes, weight, valid, None, 16, 3, [0, -1], "max", "per_head"))
        torch.library.opcheck(torch.ops.gsa.sparse_attention.default,
                              (query, key, value, blocks, valid, None, 16, None, None))
    assert {name for name, _, _ in emulated_npu.calls} == {
        "npu_sign_bits_pack", "npu_sign_bits_unpack", "npu_fused_infer_attention_score"}
