"""Attention sinks on the NPU lowering (FIA's log-sum-exp scales its output by
sigmoid(lse - sink)), run through the torch_npu emulation, against the reference."""

import pytest
import torch

from gsa_compile import functional as F
from gsa_compile import use_backend
from gsa_compile.kernels import reference

from .test_kernels import random_site, selected_blocks


@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_attention_with_sinks_matches_reference(emulated_npu, with_bias):
    batch, q_heads, kv_heads, keys, chunk = 2, 8, 2, 160, 32
    query, key, value, valid = random_site(batch, q_heads, kv_heads, keys, 64, seed=31, dtype=torch.float16)
    valid[1] = False  # nothing to attend in row 1: zeros
    bias = None
    if with_bias:
        bias = torch.randn(batch, q_heads, 1, keys, generator=torch.Generator().manual_seed(3))
    sinks = torch.linspace(-3.0, 4.0, q_heads)
    blocks = selected_blocks(query, key, valid, chunk, 3)
    with use_backend("npu"):
        got = F.sparse_attention(query, key, value, blocks, chunk_size=chunk, valid=valid, attn_bias=bias, sinks=sinks)
    expected = reference.sparse_attention(query, key, value, blocks, valid, bias, chunk, None, None, sinks)
    assert emulated_npu.calls[0][2]["softmax_lse_flag"] is True
    torch.testing.assert_close(got, expected, atol=4e-3, rtol=4e-3)
    assert got[1].eq(0).all()
    plain = reference.sparse_attention(query, key, value, blocks, valid, bias, chunk, None, None)
    assert (plain.float() - got.float()).abs().max() > 1e-2
