"""One whole attention site on the npu backend, configured by a GSAConfig's npu_* fields."""

import torch

from gsa_compile import GSAConfig, use_backend
from gsa_compile import functional as F
from gsa_compile.hashing import layer_hash_weight
from gsa_compile.kernels import reference
from gsa_compile.kernels.common import num_selected_blocks

CONFIG = GSAConfig(
    num_hidden_layers=2, top_k_ratio_per_layer=[1, 0.25], chunk_size=16, head_dim=64, hash_bits=64,
    must_select_blocks=[0, -1], npu_seq_len_threshold=150, npu_concurrency_threshold=2,
    gpu_seq_len_threshold=10, gpu_concurrency_threshold=1,
)


def site(lengths, keys=208, q_heads=8, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(len(lengths), q_heads, 1, 64, generator=gen).half()
    key = torch.randn(len(lengths), kv_heads, keys, 64, generator=gen).half()
    value = torch.randn(len(lengths), kv_heads, keys, 64, generator=gen).half()
    valid = torch.arange(keys) < torch.tensor(lengths).unsqueeze(1)  # right-padded rows
    return query, key, value, valid


def run_site(emulated_npu, lengths):
    query, key, value, valid = site(lengths)
    weight = layer_hash_weight(CONFIG, 1, 2, 64)
    with use_backend("npu"):
        codes = F.encode(key, weight)
        out, blocks = F.gsa_attention(query, key, value, weight, key_codes=codes, attn_mask=valid[:, None, None, :],
                                      return_blocks=True, **CONFIG.attention_kwargs(1, "npu"))
    ops = {name for name, _, _ in emulated_npu.calls}
    return (query, key, value, valid, weight, codes), out, blocks, ops


def test_a_decode_step_above_the_npu_thresholds_runs_sparse_on_the_npu_kernels(emulated_npu):
    (query, key, value, valid, weight, codes), out, blocks, ops = run_site(emulated_npu, [208, 170])
    assert ops == {"npu_sign_bits_pack", "npu_sign_bits_unpack", "npu_fused_infer_attention_score"}
    k = num_selected_blocks(208, 16, top_k_ratio=0.25, must_select=[0, -1])
    expected_blocks = reference.select_blocks(query, codes, weight, valid, None, 16, k, [0, -1], "max", "per_head")
    assert torch.equal(blocks[..., :k], expected_blocks) and blocks[..., k:].eq(-1).all()
    expected = reference.sparse_attention(query, key, value, expected_blocks, valid, None, 16, None, None)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_too_few_long_rows_for_npu_concurrency_threshold_runs_dense(emulated_npu):
    # One row reaches npu_seq_len_threshold = 150, npu_concurrency_threshold needs two (the gpu pair would not).
    (query, key, value, valid, _, _), out, blocks, ops = run_site(emulated_npu, [208, 120])
    assert ops == {"npu_sign_bits_pack"}  # codes are still written; attention is dense
    assert torch.equal(blocks, torch.arange(13, dtype=torch.int32).expand(2, 2, 13))
    expected = reference.dense_attention(query, key, value, valid[:, None, None, :], False, None, None)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
