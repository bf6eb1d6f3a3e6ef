"""Attention sinks on the sparse path (a logit per query head joining the softmax denominator,
transformers' `s_aux`): the reference and CPU kernels against the identity
out_with_sinks = out * sigmoid(logsumexp(logits) - sink), computed here independently."""

import pytest
import torch

from gsa_compile import functional as F
from gsa_compile.errors import GSAInputError
from gsa_compile.kernels import cpu, reference

CHUNK = 8


def sink_case(seed, batch=2, q_heads=6, kv_heads=2, num_keys=45, dim=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, num_keys, dim, generator=gen, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, num_keys, dim, generator=gen, dtype=torch.float64)
    valid = torch.rand(batch, num_keys, generator=gen) > 0.3
    n_blocks = -(-num_keys // CHUNK)
    scores = torch.rand(batch, kv_heads, n_blocks, generator=gen, dtype=torch.float64)
    blocks = reference.top_blocks(scores, [0, -1], 4)
    # Sinks from well below to well above the logits, so the term matters and the shift is exercised.
    sinks = torch.linspace(-4.0, 6.0, q_heads, dtype=torch.float64)
    return [t.to(dtype) if t.is_floating_point() else t for t in (query, key, value)] + [valid, blocks, sinks.to(dtype)]


def expected_with_sinks(query, key, value, blocks, valid, bias, scale, softcap, sinks):
    """The sink identity in float64 from plain torch (logits over the attended keys)."""
    q, k, v = query.double(), key.double(), value.double()
    groups = q.shape[1] // k.shape[1]
    allowed = reference.selected_token_mask(blocks, CHUNK, k.shape[2]) & valid[:, None, :]
    allowed = allowed.repeat_interleave(groups, dim=1)[:, :, None, :]
    logits = torch.einsum("bhtd,bhld->bhtl", q, k.repeat_interleave(groups, dim=1)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:
        logits = logits + bias.double()
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    weights = torch.exp(logits - lse).nan_to_num(0.0)
    out = weights @ v.repeat_interleave(groups, dim=1)
    return out * torch.sigmoid(lse - sinks.double().view(1, -1, 1, 1))


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_adds_the_sink_term_exactly(softcap, with_bias):
    query, key, value, valid, blocks, sinks = sink_case(1)
    bias = None
    if with_bias:
        bias = torch.randn(2, 6, 1, key.shape[2], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = reference.sparse_attention(query, key, value, blocks, valid, bias, CHUNK, 0.3, softcap, sinks)
    expected = expected_with_sinks(query, key, value, blocks, valid, bias, 0.3, softcap, sinks)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    plain = reference.sparse_attention(query, key, value, blocks, valid, bias, CHUNK, 0.3, softcap)
    assert (got - plain).abs().max() > 1e-3  # the sinks change the output


@pytest.mark.parametrize("mask", ["valid", "bias"])
def test_cpu_kernel_matches_reference_with_sinks(mask):
    query, key, value, valid, blocks, sinks = sink_case(2, dtype=torch.float32)
    bias = None
    if mask == "bias":
        bias = torch.zeros(2, 1, 1, key.shape[2]).masked_fill(~valid[:, None, None, :], float("-inf"))
        valid = None
    got = cpu.sparse_attention(query, key, value, blocks, valid, bias, CHUNK, None, None, sinks)
    expected = reference.sparse_attention(query.double(), key.double(), value.double(), blocks, valid,
                                          bias, CHUNK, None, None, sinks.double())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_row_with_no_attended_key_gives_zeros_with_sinks():
    query, key, value, valid, blocks, sinks = sink_case(4, dtype=torch.float32)
    valid[0] = False
    for kernel in (reference.sparse_attention, cpu.sparse_attention):
        out = kernel(query, key, value, blocks, valid, None, CHUNK, None, None, sinks)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert out[1].abs().sum() > 0


def test_the_op_takes_sinks_and_refuses_a_wrong_shape():
    query, key, value, valid, blocks, sinks = sink_case(5, dtype=torch.float32)
    got = F.sparse_attention(query, key, value, blocks, chunk_size=CHUNK, valid=valid, sinks=sinks)
    expected = reference.sparse_attention(query, key, value, blocks, valid, None, CHUNK, None, None, sinks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(GSAInputError, match=r"sinks must be a float \[Hq\] = \[6\]"):
        F.sparse_attention(query, key, value, blocks, chunk_size=CHUNK, valid=valid, sinks=sinks[:2])


def test_the_op_with_sinks_passes_opcheck():
    from gsa_compile import ops

    query, key, value, valid, blocks, sinks = sink_case(6, dtype=torch.float32)
    torch.library.opcheck(ops.sparse_attention_op, (query, key, value, blocks, valid, None, CHUNK, None, None, sinks),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
