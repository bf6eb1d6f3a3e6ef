"""The torch_npu emulation against the examples and constraints its documentation states, so the
kernels' tests rest on the documented behaviour rather than on the emulation's own reading."""

import pytest
import torch

from . import torch_npu_emulation as npu

DOC_VALUES = [5, 4, 3, 2, 0, -1, -2, 4, 3, 2, 1, 0, -1, -2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sign_bits_pack_reproduces_the_documented_example(dtype):
    values = torch.tensor(DOC_VALUES, dtype=dtype)
    assert npu.npu_sign_bits_pack(values, 2).tolist() == [[159], [15]]
    assert npu.npu_sign_bits_pack(values, 1).tolist() == [[159, 15]]


def test_sign_bits_unpack_reproduces_the_documented_example():
    unpacked = npu.npu_sign_bits_unpack(torch.tensor([159, 15], dtype=torch.uint8), 2, torch.float32)
    assert unpacked.tolist() == [[1, 1, 1, 1, 1, -1, -1, 1], [1, 1, 1, 1, -1, -1, -1, -1]]


@pytest.mark.parametrize("call", [
    lambda: npu.npu_sign_bits_pack(torch.zeros(2, 8), 2),
    lambda: npu.npu_sign_bits_pack(torch.zeros(16, dtype=torch.float64), 2),
    lambda: npu.npu_sign_bits_pack(torch.zeros(16), 3),
    lambda: npu.npu_sign_bits_unpack(torch.zeros(2, dtype=torch.int32), 2, torch.float32),
    lambda: npu.npu_sign_bits_unpack(torch.zeros(2, dtype=torch.uint8), 2, torch.bfloat16),
])
def test_sign_bits_ops_refuse_what_the_documentation_refuses(call):
    with pytest.raises(RuntimeError, match="torch_npu emulation"):
        call()


def fia_inputs(batch=2, heads=8, kv_heads=2, keys=64, dim=32, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    value = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(dtype)
    return query, key, value


def sdpa(query, key, value, mask=None, scale=None):
    return torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, scale=scale, enable_gqa=True).to(query.dtype)


def test_fia_bnsd_with_a_mask_is_sdpa_with_the_mask_inverted():
    query, key, value = fia_inputs()
    masked = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) > 0.7
    out, lse = npu.npu_fused_infer_attention_score(
        query, key, value, atten_mask=masked.view(2, 1, 1, 64), num_heads=8, num_key_value_heads=2,
        scale=0.25, input_layout="BNSD")
    torch.testing.assert_close(out, sdpa(query, key, value, ~masked.view(2, 1, 1, 64), 0.25), atol=1e-3, rtol=1e-3)
    assert lse.shape == (1,)


def test_fia_reads_the_pages_its_block_table_names():
    query, key, value = fia_inputs(batch=1, keys=64)
    # Logical blocks 0..3 of 16 tokens stored in pages [2, 0, 3, 1] of a (blocknum, KV_N, blocksize, D) cache.
    order = [2, 0, 3, 1]
    pages_k = torch.empty(4, 2, 16, 32, dtype=key.dtype)
    pages_v = torch.empty_like(pages_k)
    for logical, page in enumerate(order):
        pages_k[page] = key[0, :, 16 * logical:16 * (logical + 1)]
        pages_v[page] = value[0, :, 16 * logical:16 * (logical + 1)]
    out, _ = npu.npu_fused_infer_attention_score(
        query, pages_k, pages_v, block_table=torch.tensor([order], dtype=torch.int32), actual_seq_lengths_kv=[56],
        num_heads=8, num_key_value_heads=2, scale=0.2, input_layout="BNSD", block_size=16)
    torch.testing.assert_close(out, sdpa(query, key[:, :, :56], value[:, :, :56], scale=0.2), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("change, message", [
    (dict(dtype=torch.float32), "float16 or bfloat16"),
    (dict(block_size=8), "multiple of 16"),
    (dict(actual_seq_lengths_kv=None), "actual_seq_lengths_kv is required"),
    (dict(pse_scale=0.5), "pse_shift with scale != 1"),
    (dict(num_heads=4), "num_heads=4 must equal"),
])
def test_fia_refuses_what_the_documentation_refuses(change, message):
    query, key, value = fia_inputs(batch=1, dtype=change.get("dtype", torch.float16))
    kwargs = dict(block_table=torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), actual_seq_lengths_kv=[64],
                  num_heads=8, num_key_value_heads=2, input_layout="BNSD", block_size=16, scale=1.0)
    kwargs.update({k: v for k, v in change.items() if k in kwargs})
    if "pse_scale" in change:
        kwargs.update(scale=change["pse_scale"], pse_shift=torch.zeros(1, 8, 1, 64, dtype=query.dtype))
    block_size = kwargs["block_size"]
    pages = key.view(2, 64 // block_size, block_size, 32).transpose(0, 1).contiguous()
    with pytest.raises(RuntimeError, match=message):
        npu.npu_fused_infer_attention_score(query, pages, pages, **kwargs)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.npu_sign_bits_pack(torch.zeros(8), size=1.0), "size must be int"),
    (lambda m: m.npu_sign_bits_unpack(torch.zeros(1, dtype=torch.uint8), 1, "float32"), "dtype must be ScalarType"),
    (lambda m: m.npu_fused_infer_attention_score(*fia_inputs(), scale_value=0.1), "unexpected or repeated"),
    (lambda m: m.npu_fused_infer_attention_score(*fia_inputs(), actual_seq_lengths_kv=torch.tensor([64])),
     "actual_seq_lengths_kv must be SymInt"),
])
def test_calls_are_bound_to_the_operators_declared_schemas(call, message):
    with pytest.raises(TypeError, match=message):
        call(npu.build())
