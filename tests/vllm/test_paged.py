"""The plugin's paged-memory reads and writes against contiguous tensors (pure torch: runs with
or without vLLM): codes and keys scattered over shuffled pages read back in token order, and
attention over the selected blocks of the paged cache equals the reference over the same
blocks of the contiguous cache."""

import torch

from gsa_compile.functional import encode, hash_weights, select_blocks
from gsa_compile.kernels import reference
from gsa_compile.vllm import paged

PAGE, HEADS, GROUP, DIM, BITS, CHUNK = 8, 2, 2, 16, 32, 8


def _paged(seq_lens, pages=16, seed=0):
    """Contiguous keys/values/codes of a batch, and the same written into shuffled pages."""
    generator = torch.Generator().manual_seed(seed)
    batch, longest = len(seq_lens), max(seq_lens)
    keys = torch.randn(batch, HEADS, longest, DIM, generator=generator)
    values = torch.randn(batch, HEADS, longest, DIM, generator=generator)
    weight = hash_weights(HEADS, DIM, BITS, seed=1)
    codes = encode(keys, weight)
    width = -(-longest // PAGE)
    table = torch.randperm(pages, generator=generator)[: batch * width].view(batch, width).to(torch.int32)
    cache = torch.zeros(pages, HEADS, PAGE, 2 * DIM)
    codes_cache = torch.zeros(pages, HEADS, PAGE, BITS // 8, dtype=torch.uint8)
    for row, length in enumerate(seq_lens):
        positions = torch.arange(length)
        slots = table[row, positions // PAGE].to(torch.int64) * PAGE + positions % PAGE
        paged.write_codes(codes_cache, codes[row, :, :length].transpose(0, 1), slots)
        paged.CPU_VEC_LAYOUT.keys(cache)[slots // PAGE, :, slots % PAGE] = keys[row, :, :length].transpose(0, 1)
        paged.CPU_VEC_LAYOUT.values(cache)[slots // PAGE, :, slots % PAGE] = values[row, :, :length].transpose(0, 1)
    return keys, values, weight, codes, table, cache, codes_cache


def test_codes_read_back_in_token_order_and_padding_slots_are_skipped():
    seq_lens = [21, 13, 5]
    _, _, _, codes, table, _, codes_cache = _paged(seq_lens)
    before = codes_cache.clone()
    paged.write_codes(codes_cache, codes[0, :, :2].transpose(0, 1), torch.tensor([-1, -1]))
    assert torch.equal(codes_cache, before)
    gathered = paged.gather_codes(codes_cache, table, max(seq_lens))
    for row, length in enumerate(seq_lens):
        assert torch.equal(gathered[row, :, :length], codes[row, :, :length])


def test_attention_over_selected_paged_blocks_equals_the_reference():
    seq_lens = torch.tensor([37, 20, 29])
    keys, values, weight, codes, table, cache, _ = _paged(seq_lens.tolist())
    num_keys = keys.shape[2]
    valid = torch.arange(num_keys)[None, :] < seq_lens[:, None]
    query = torch.randn(len(seq_lens), HEADS * GROUP, 1, DIM, generator=torch.Generator().manual_seed(3))
    blocks = select_blocks(query, codes, weight, chunk_size=CHUNK, num_blocks=3, valid=valid)
    assert (blocks[:, :, 0] >= 0).all() and blocks.shape == (3, HEADS, 3)
    out = paged.attend_selected(query, paged.CPU_VEC_LAYOUT, cache, table, seq_lens, blocks, CHUNK, num_keys,
                                DIM ** -0.5, None)
    expected = reference.sparse_attention(query, keys, values, blocks, valid, None, CHUNK, DIM ** -0.5, None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
