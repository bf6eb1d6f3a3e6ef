"""MLA latent-space scoring (gsa_compile.mla): the absorption identity, and the reference and
CPU kernels against the literal latent similarity at DeepSeek-V3's group of 128 heads."""

import pytest
import torch

from gsa_compile import mla
from gsa_compile.config import GSAConfig
from gsa_compile.hashing import layer_hash_weight
from gsa_compile.kernels import cpu, reference

# DeepSeek-V3's heads and latent dims; small nope/value dims keep W_UK cheap.
HEADS, NOPE, ROPE, VALUE, LATENT = 128, 16, 64, 8, 512
LAYOUT = mla.LatentLayout(HEADS, NOPE, ROPE, VALUE, LATENT)


def _config(**fields):
    return GSAConfig(num_hidden_layers=2, is_mla=True, head_dim=LATENT + ROPE, hash_bits=576, kv_lora_rank=LATENT,
                     qk_rope_head_dim=ROPE, hash_bits_kv_lora=512, hash_bits_qk_rope=64,
                     top_k_ratio_per_layer=[1, 0.5], top_k_index_reuse=[-1, -1], **fields)


@pytest.fixture(scope="module")
def weight():
    return layer_hash_weight(_config(), 1, 1, LATENT + ROPE)


def _inputs(batch=2, num_keys=300, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv_b = torch.randn(HEADS * (NOPE + VALUE), LATENT, generator=gen, dtype=dtype) / LATENT ** 0.5
    c_kv = torch.randn(batch, 1, num_keys, LATENT, generator=gen, dtype=dtype)
    k_rope = torch.randn(batch, 1, num_keys, ROPE, generator=gen, dtype=dtype)
    query = torch.randn(batch, HEADS, 1, NOPE + ROPE, generator=gen, dtype=dtype)
    return kv_b, c_kv, k_rope, query


def test_absorbed_query_dot_latent_key_is_the_expanded_logit():
    kv_b, c_kv, k_rope, query = _inputs()
    w_uk = LAYOUT.key_up_projection(kv_b)
    # The keys the model's expand_kv builds: [W_UK[h] c_kv | k_rope] per head.
    k_nope = torch.einsum("hnl,bxtl->bhtn", w_uk, c_kv)
    expanded = torch.cat([k_nope, k_rope.expand(-1, HEADS, -1, -1)], dim=-1)
    logits = torch.einsum("bhqd,bhtd->bhqt", query, expanded)
    latent = torch.einsum("bhqd,bxtd->bhqt", mla.absorb_query(query, w_uk, NOPE), mla.latent_keys(c_kv, k_rope))
    torch.testing.assert_close(latent, logits, rtol=1e-12, atol=1e-10)


def test_latent_weight_is_block_diagonal_with_both_parts(weight):
    assert weight.shape == (1, 576, 576)
    assert (weight[0, :LATENT, 512:] == 0).all() and (weight[0, LATENT:, :512] == 0).all()
    # Each part is orthogonal (Haar columns): the code's bits are decorrelated within a part.
    for block in (weight[0, :LATENT, :512], weight[0, LATENT:, 512:]):
        torch.testing.assert_close(block.T.double() @ block.double(), torch.eye(block.shape[1], dtype=torch.float64),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", [reference, cpu], ids=["reference", "cpu"])
def test_latent_scores_equal_the_literal_similarity(kernel, weight):
    kv_b, c_kv, k_rope, query = _inputs()
    w_uk = LAYOUT.key_up_projection(kv_b)
    codes = reference.encode(mla.latent_keys(c_kv, k_rope), weight)
    assert codes.shape == (2, 1, 300, (512 + 64) // 8)
    expected = mla.reference_similarity(query, w_uk, NOPE, c_kv, k_rope, weight)
    got = kernel.token_similarity(mla.absorb_query(query, w_uk, NOPE), codes, weight)
    assert torch.equal(got[:, 0], expected)


@pytest.mark.parametrize("repre", ["max", "sum"])
def test_latent_selection_is_one_selection_per_row_for_every_head(repre, weight):
    kv_b, c_kv, k_rope, query = _inputs(dtype=torch.float32, seed=3)
    w_uk = LAYOUT.key_up_projection(kv_b)
    codes = reference.encode(mla.latent_keys(c_kv, k_rope), weight)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :37] = False  # left padding
    args = (codes, weight, valid, None, 16, 6, [0, -2, -1], repre)
    blocks = mla.latent_select_blocks(query, w_uk, NOPE, *args)  # the CPU kernel
    assert blocks.shape == (2, HEADS, 6)
    assert (blocks == blocks[:, :1]).all()
    expected = reference.select_blocks(mla.absorb_query(query, w_uk, NOPE), codes, weight, valid, None, 16, 6,
                                       [0, -2, -1], repre, "per_head")
    assert torch.equal(blocks[:, :1], expected)


def test_fixed_latent_weights_load_from_their_two_files(tmp_path):
    from gsa_compile.errors import GSAConfigError
    from gsa_compile.hashing import hash_weights, mla_hash_weights, save_hash_weights

    latent, rope = hash_weights(1, LATENT, 512, seed=9), hash_weights(1, ROPE, 64, seed=10)
    save_hash_weights({1: latent}, str(tmp_path / "latent.safetensors"))
    save_hash_weights({1: rope}, str(tmp_path / "rope.safetensors"))
    config = _config(hash_weight_type="fixed", hash_weight_kv_lora=str(tmp_path / "latent.safetensors"),
                     hash_weight_qk_rope=str(tmp_path / "rope.safetensors"))
    assert torch.equal(layer_hash_weight(config, 1, 1, LATENT + ROPE), mla_hash_weights(latent, rope))
    # An expanded-key file (one weight per head over the nope dims) does not fit the latent route.
    save_hash_weights({1: hash_weights(2, NOPE, 512)}, str(tmp_path / "latent.safetensors"))
    with pytest.raises(GSAConfigError, match=r"hash_weight_kv_lora for layer 1 has shape \(2, 16, 512\).*\(1, 512, 512\)"):
        layer_hash_weight(config, 1, 1, LATENT + ROPE)
