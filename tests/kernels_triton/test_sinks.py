"""Attention sinks in the Triton decode kernel: exp(sink) joins the denominator of the merged
splits; checked against the reference (interpreter on CPU, or GSA_TRITON_DEVICE=cuda)."""

import pytest
import torch

from gsa_compile.kernels import reference as ref
from gsa_compile.kernels.triton import decode_attention as triton_attention

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sink_shift", [-3.0, 0.0, 12.0])  # below, near and far above the logits
def test_sparse_attention_with_sinks_matches_reference(device, dtype, sink_shift):
    gen = torch.Generator().manual_seed(7)
    batch, q_heads, kv_heads, num_keys, dim, chunk = 2, 8, 2, 70, 32, 16
    query = torch.randn(batch, q_heads, 1, dim, generator=gen).to(device, dtype)
    keys = torch.randn(batch, kv_heads, num_keys, dim, generator=gen).to(device, dtype)
    values = torch.randn(batch, kv_heads, num_keys, dim, generator=gen).to(device, dtype)
    valid = (torch.rand(batch, num_keys, generator=gen) > 0.3).to(device)
    valid[1, :] = False  # a row with nothing to attend: zeros, sinks or not
    scores = torch.rand(batch, kv_heads, 5, generator=gen, dtype=torch.float64)
    blocks = ref.top_blocks(scores, [0, -1], 3).to(device)
    sinks = (torch.randn(q_heads, generator=gen) + sink_shift).to(device)
    out = triton_attention.sparse_attention(query, keys, values, blocks, valid, None, chunk, None, None, sinks)
    expected = ref.sparse_attention(query.double(), keys.double(), values.double(), blocks, valid, None, chunk,
                                    None, None, sinks.double())
    assert torch.equal(out[1].float().cpu(), torch.zeros(q_heads, 1, dim))
    error = (out.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-6)
    assert error < TOLERANCE[dtype]
    plain = triton_attention.sparse_attention(query, keys, values, blocks, valid, None, chunk, None, None)
    assert (plain.double() - out.double()).abs().max() > 1e-3
