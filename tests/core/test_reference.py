"""The reference kernels against the naive loop implementation of docs/semantics.md."""

import math

import pytest
import torch

from gsa_compile import functional as F
from gsa_compile.kernels import reference

from .brute_force import attention as brute_attention
from .brute_force import code_bits, packed
from .brute_force import select as brute_select

CASES = [
    # batch, q_heads, kv_heads, keys, dim, bits, chunk, k
    (1, 4, 4, 37, 16, 16, 8, 3),
    (2, 4, 2, 50, 8, 24, 16, 3),
    (2, 8, 1, 33, 12, 8, 4, 5),
    (1, 6, 3, 64, 16, 32, 16, 4),
]


@pytest.mark.parametrize("case", CASES)
def test_encode_matches_bitwise_definition(case):
    batch, _, kv_heads, keys, dim, bits, _, _ = case
    gen = torch.Generator().manual_seed(sum(case))
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen, dtype=torch.float64)
    weight = F.hash_weights(kv_heads, dim, bits, seed=3).double()
    codes = reference.encode(key, weight)
    assert codes.dtype == torch.uint8 and codes.shape == (batch, kv_heads, keys, bits // 8)
    for b in range(batch):
        for h in range(kv_heads):
            for j in range(keys):
                assert codes[b, h, j].tolist() == packed(code_bits(key[b, h, j], weight[h]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("repre", ["max", "min", "sum"])
def test_select_matches_brute_force(case, repre):
    batch, q_heads, kv_heads, keys, dim, bits, chunk, k = case
    gen = torch.Generator().manual_seed(7 * sum(case) + len(repre))
    query = torch.randn(batch, q_heads, 1, dim, generator=gen, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen, dtype=torch.float64)
    valid = torch.rand(batch, keys, generator=gen) > 0.25
    weight = F.hash_weights(kv_heads, dim, bits, seed=5).double()
    must = [0, -2, -1]
    for norms in (False, True):
        for scope in ("per_head", "shared"):
            got = reference.select_blocks(
                query, reference.encode(key, weight), weight, valid,
                F.key_norms(key).double() if norms else None, chunk, k, must, repre, scope,
            )
            expected = brute_select(query, key, weight, chunk=chunk, k=k, must=must, repre=repre,
                                    valid=valid, norms=norms, shared=scope == "shared")
            for b in range(batch):
                for h in range(kv_heads):
                    row = got[b, h].tolist()
                    chosen = [c for c in row if c >= 0]
                    assert chosen == expected[b][h], (norms, scope, b, h)
                    assert row[len(chosen):] == [-1] * (k - len(chosen))


@pytest.mark.parametrize("case", CASES)
def test_sparse_attention_matches_brute_force(case):
    batch, q_heads, kv_heads, keys, dim, _, chunk, k = case
    gen = torch.Generator().manual_seed(11 * sum(case))
    query = torch.randn(batch, q_heads, 1, dim, generator=gen, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, keys, dim + 3, generator=gen, dtype=torch.float64)
    valid = torch.rand(batch, keys, generator=gen) > 0.3
    n_blocks = math.ceil(keys / chunk)
    blocks = torch.stack([torch.randperm(n_blocks, generator=gen)[:k] for _ in range(batch * kv_heads)])
    blocks = blocks.sort(-1).values.reshape(batch, kv_heads, -1).to(torch.int32)
    selected = [[blocks[b, h].tolist() for h in range(kv_heads)] for b in range(batch)]
    bias = torch.randn(batch, q_heads, 1, keys, generator=gen, dtype=torch.float64)
    for softcap, use_bias in ((None, False), (5.0, True)):
        got = reference.sparse_attention(query, key, value, blocks, valid, bias if use_bias else None,
                                         chunk, 0.3, softcap)
        expected = brute_attention(query, key, value, selected, chunk=chunk, valid=valid, scale=0.3,
                                   softcap=softcap, bias=bias if use_bias else None)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("repre", ["max", "sum"])
@pytest.mark.parametrize("scope", ["per_head", "shared"])
def test_limit_and_masked_tail_match_brute_force(repre, scope):
    """A static cache: rows end before L (the unused tail masked), so negative must-select
    indices count from each row's last valid block; limit caps each row's count."""
    batch, q_heads, kv_heads, keys, dim, bits, chunk, k = 4, 4, 2, 70, 16, 16, 8, 5
    gen = torch.Generator().manual_seed(29)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen, dtype=torch.float64)
    weight = F.hash_weights(kv_heads, dim, bits, seed=5).double()
    valid = torch.rand(batch, keys, generator=gen) > 0.2
    valid[0, -1] = True  # row 0 reaches the end of the cache
    valid[1, 37:] = False  # row 1 ends inside block 4
    valid[2, :9], valid[2, 50:] = False, False  # left padding and an unused tail
    valid[3, 3:] = False  # one block long: block 0 is also blocks -1 and -2
    limit = torch.tensor([7, 3, 0, 1], dtype=torch.int32)
    must = [0, -2, -1]
    codes = reference.encode(key, weight)
    got = reference.select_blocks(query, codes, weight, valid, None, chunk, k, must, repre, scope, limit)
    expected = brute_select(query, key, weight, chunk=chunk, k=k, must=must, repre=repre, valid=valid,
                            shared=scope == "shared", limit=limit)
    assert [[[c for c in row if c >= 0] for row in rows] for rows in got.tolist()] == expected
    assert expected[1] == [[0, 3, 4]] * 2 and expected[2] == [[], []] and expected[3] == [[0], [0]]
    # Without a limit or a masked tail nothing changes: the last blocks of the cache are selected.
    full = reference.select_blocks(query, codes, weight, None, None, chunk, k, must, repre, scope)
    assert (full[..., -2:] == torch.tensor([7, 8], dtype=torch.int32)).all()
