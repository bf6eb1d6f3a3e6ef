"""Triton latent-space scoring (MLA): DeepSeek-V3's 128 heads sharing one latent KV head,
576-bit codes (512 latent + 64 rope), against the reference."""

import pytest
import torch

from gsa_compile import mla
from gsa_compile.hashing import hash_weights, mla_hash_weights
from gsa_compile.kernels import reference as ref
from gsa_compile.kernels.common import sign_planes
from gsa_compile.kernels.triton import hash_encode as triton_encode
from gsa_compile.kernels.triton import selection as triton_select

HEADS, NOPE, ROPE, VALUE, LATENT = 128, 16, 64, 8, 512


@pytest.fixture
def inputs(device, real_sizes):
    gen = torch.Generator().manual_seed(7)
    batch, num_keys = 2, (32768 + 5 if real_sizes else 260)
    weight = mla_hash_weights(hash_weights(1, LATENT, 512, seed=1), hash_weights(1, ROPE, 64, seed=2)).to(device)
    kv_b = (torch.randn(HEADS * (NOPE + VALUE), LATENT, generator=gen) / LATENT ** 0.5).to(device)
    keys = torch.randn(batch, 1, num_keys, LATENT + ROPE, generator=gen).to(device)
    query = torch.randn(batch, HEADS, 1, NOPE + ROPE, generator=gen).to(device)
    absorbed = mla.absorb_query(query, mla.LatentLayout(HEADS, NOPE, ROPE, VALUE, LATENT).key_up_projection(kv_b), NOPE)
    return absorbed, keys, weight


def test_wide_codes_encode_as_the_reference(inputs):
    _, keys, weight = inputs
    codes = triton_encode.encode(keys, weight)
    assert codes.shape[-1] == 72
    projected = keys.double() @ weight[0].double()
    differing = ref.unpack_codes(codes) != ref.unpack_codes(ref.encode(keys, weight))
    assert not differing[projected.abs() > 1e-4].any()


def test_planes_of_128_heads_are_the_sign_planes_of_their_codes(inputs):
    absorbed, _, weight = inputs
    planes = triton_encode.query_planes(absorbed, weight)
    assert planes.shape == (2, 1, 8, 72)  # 1 + log2(128) planes
    assert torch.equal(planes, sign_planes(triton_encode.encode(absorbed, weight)[:, :, 0], 1))


@pytest.mark.parametrize("repre", ["max", "sum"])
def test_latent_selection_equals_reference(inputs, device, repre):
    absorbed, keys, weight = inputs
    codes = ref.encode(keys, weight)
    valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=device)
    valid[1, :40] = False
    args = (absorbed, codes, weight, valid, None, 16, 5, [0, -2, -1], repre, "per_head")
    assert triton_select.select_blocks_supports(*args) is None
    assert torch.equal(triton_select.select_blocks(*args), ref.select_blocks(*args))
