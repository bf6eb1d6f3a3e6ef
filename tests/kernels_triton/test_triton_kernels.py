"""Triton kernels against the reference: selection exactly, attention to rounding.

Sizes are small on CPU (interpreter) and real on CUDA (see conftest.py)."""

import pytest
import torch

import gsa_compile
from gsa_compile import functional as F
from gsa_compile.hashing import hash_weights
from gsa_compile.kernels import choose_kernel
from gsa_compile.kernels import reference as ref
from gsa_compile.kernels.triton import decode_attention as triton_attention
from gsa_compile.kernels.triton import hash_encode as triton_encode
from gsa_compile.kernels.triton import selection as triton_select

# Relative error allowed against a float64 reference: the output's own rounding plus
# bf16/fp16 probabilities inside the kernel.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def relative_error(out, expected):
    out, expected = out.double(), expected.double()
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def scaled(real_sizes, small, real):
    return real if real_sizes else small


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20261128)


def randn(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------ encode
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,bits", [(4, 2, 64, 128), (2, 2, 192, 72), (3, 1, 128, 16)])
def test_encode_matches_reference_away_from_zero(gen, device, real_sizes, dtype, heads, kv_heads, dim, bits):
    length = scaled(real_sizes, 37, 4099)
    x = randn(gen, 2, heads, length, dim, dtype=dtype, device=device)
    weight = hash_weights(kv_heads, dim, bits, seed=3).to(device)
    codes = triton_encode.encode(x, weight)
    expected = ref.encode(x, weight)
    assert codes.dtype == torch.uint8 and codes.shape == expected.shape
    # Signs may only differ where the projection is within float32 rounding of zero.
    projected = torch.einsum("bhld,hdr->bhlr", x.double(), weight.double().repeat_interleave(heads // kv_heads, 0))
    differing = ref.unpack_codes(codes) != ref.unpack_codes(expected)
    assert not differing[projected.abs() > 1e-4].any()


def test_encode_into_writes_only_the_given_positions(gen, device):
    weight = hash_weights(2, 64, 128, seed=1).to(device)
    cache = torch.full((1, 2, 50, 16), 7, dtype=torch.uint8, device=device)
    keys = randn(gen, 1, 2, 5, 64, device=device)
    triton_encode.encode_into(keys, weight, cache[:, :, 20:25])
    assert torch.equal(cache[:, :, 20:25], ref.encode(keys, weight))
    assert (cache[:, :, :20] == 7).all() and (cache[:, :, 25:] == 7).all()


# ------------------------------------------------------------------------------ selection
SELECT_CASES = [
    # batch, q_heads, kv_heads, keys, dim, bits, chunk, k, repre, norms, masked, must, scope
    (2, 8, 2, 300, 64, 64, 16, 5, "max", False, True, (0, -2, -1), "per_head"),
    (1, 4, 4, 100, 32, 32, 8, 4, "sum", True, True, (0, -2, -1), "per_head"),
    (2, 6, 2, 77, 64, 32, 16, 3, "min", False, False, (0, -1), "shared"),
    (1, 3, 1, 130, 64, 8, 4, 40, "max", False, False, (0, 3, -1, -3, 5, 0), "per_head"),
    (2, 4, 2, 50, 32, 16, 8, 12, "sum", False, True, (), "per_head"),
]


@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: f"{c[8]}-{c[12]}-k{c[7]}")
def test_select_blocks_equals_reference(gen, device, real_sizes, case):
    batch, q_heads, kv_heads, num_keys, dim, bits, chunk, k, repre, norms, masked, must, scope = case
    if real_sizes:
        num_keys, chunk, k = num_keys * 64 + 17, 128, max(k, len(must))
    query = randn(gen, batch, q_heads, 1, dim, device=device)
    keys = randn(gen, batch, kv_heads, num_keys, dim, device=device)
    weight = hash_weights(kv_heads, dim, bits, seed=5).to(device)
    codes = ref.encode(keys, weight)
    valid = (torch.rand(batch, num_keys, generator=gen) > 0.3).to(device) if masked else None
    if valid is not None:
        valid[-1] = False  # a row with no valid key selects nothing
    key_norms = F.key_norms(keys) if norms else None
    args = (query, codes, weight, valid, key_norms, chunk, k, list(must), repre, scope)
    blocks = triton_select.select_blocks(*args)
    assert blocks.dtype == torch.int32
    assert torch.equal(blocks, ref.select_blocks(*args))


@pytest.mark.parametrize("integer_span", [0, 3, 512])
def test_top_blocks_breaks_ties_to_the_lower_index(device, integer_span):
    scores = torch.tensor([[[1.0, 3.0, 3.0, float("-inf"), 3.0, float("inf"), -2.0, 3.0]]], dtype=torch.float64)
    blocks = triton_select.top_blocks(scores.to(device), 4, integer_span)
    assert blocks.tolist() == [[[1, 2, 4, 5]]]
    blocks = triton_select.top_blocks(scores.to(device), 9, integer_span)
    assert blocks.tolist() == [[[0, 1, 2, 4, 5, 6, 7, -1, -1]]]
    none_valid = torch.full((1, 2, 5), float("-inf"), dtype=torch.float64, device=device)
    assert (triton_select.top_blocks(none_valid, 3, integer_span) == -1).all()


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8, 16])
def test_query_planes_are_the_sign_planes_of_the_codes(gen, device, groups):
    from gsa_compile.kernels.common import sign_planes

    query = randn(gen, 2, 2 * groups, 1, 64, device=device)
    weight = hash_weights(2, 64, 128, seed=groups).to(device)
    planes = triton_encode.query_planes(query, weight)
    assert torch.equal(planes, sign_planes(triton_encode.encode(query, weight)[:, :, 0], 2))


@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16])
def test_select_with_limit_and_static_cache_tail_equals_reference(gen, device, real_sizes, groups):
    """Every GQA group size through the planes, rows of a static cache ending before L (negative
    must-select indices count from each row's last valid block) and a per-row limit on the device."""
    batch, kv_heads, chunk, k = 4, 2, 16, 5
    num_keys = 120
    if real_sizes:
        kv_heads, num_keys, chunk, k = 8, 32_768 + 77, 128, 16
    query = randn(gen, batch, kv_heads * groups, 1, 64, device=device)
    keys = randn(gen, batch, kv_heads, num_keys, 64, device=device)
    weight = hash_weights(kv_heads, 64, 128, seed=11).to(device)
    codes = ref.encode(keys, weight)
    valid = torch.ones(batch, num_keys, dtype=torch.bool)
    valid[1, num_keys // 2 + 5:] = False  # a shorter row of the static cache
    valid[2, :chunk + 3], valid[2, num_keys // 3:] = False, False  # left padding, then the unused tail
    valid[3, chunk // 2:] = False  # half a block: block 0 is also -2 and -1
    valid = valid.to(device)
    limit = torch.tensor([k, k - 2, 2, 0], dtype=torch.int32, device=device)
    norms = F.key_norms(keys)
    for repre, key_norms, scope, row_limit in (("max", None, "per_head", limit), ("sum", norms, "per_head", limit),
                                               ("max", None, "shared", limit), ("min", None, "per_head", None)):
        args = (query, codes, weight, valid, key_norms, chunk, k, [0, -2, -1], repre, scope, row_limit)
        blocks = triton_select.select_blocks(*args)
        assert torch.equal(blocks, ref.select_blocks(*args)), (repre, scope, row_limit is None)
    row_blocks = -(-(num_keys // 2 + 5) // chunk)
    assert {row_blocks - 2, row_blocks - 1} <= set(blocks[1, 0].tolist())  # the row's own recent window


def test_top_blocks_limit_and_per_row_must_select(device):
    inf = float("inf")
    scores = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 3.0, -inf, -inf]], [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]],
                          dtype=torch.float64, device=device)
    limit = torch.tensor([3, 1], dtype=torch.int32, device=device)
    blocks = triton_select.top_blocks(scores, 4, 0, [0, -1], limit)
    # Row 0 ends at block 4, so -1 is block 4; row 1 takes only its first must-select block.
    assert blocks.tolist() == [[[0, 2, 4, -1]], [[0, -1, -1, -1]]]
    assert torch.equal(blocks, ref.top_blocks(scores, [0, -1], 4, torch.tensor([5, 7], device=device), limit))


# ------------------------------------------------------------------------------ attention
ATTENTION_CASES = [
    # q_heads, kv_heads, dim, dim_v, chunk, k, mask kind, softcap
    (8, 2, 64, 64, 16, 5, "valid", None),
    (4, 4, 128, 128, 32, 3, "bias_shared", None),
    (12, 4, 192, 128, 16, 4, "bias_per_head", 30.0),
    (3, 1, 256, 256, 8, 6, "none", None),
    (5, 5, 64, 32, 16, 2, "valid", 5.0),
]


def make_mask(kind, gen, batch, q_heads, num_keys, device):
    if kind == "valid":
        valid = torch.rand(batch, num_keys, generator=gen) > 0.4
        return valid.to(device), None
    if kind == "none":
        return None, None
    heads = 1 if kind == "bias_shared" else q_heads
    bias = torch.randn(batch, heads, 1, num_keys, generator=gen)
    bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) > 0.7, float("-inf"))
    return None, bias.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"g{c[0] // c[1]}-d{c[2]}-dv{c[3]}-{c[6]}")
def test_sparse_attention_matches_reference(gen, device, real_sizes, dtype, case):
    q_heads, kv_heads, dim, dim_v, chunk, k, mask_kind, softcap = case
    batch, num_keys = 2, 90
    if real_sizes:
        batch, num_keys, chunk, k = 4, 16_411, 128, 16 * k
    query = randn(gen, batch, q_heads, 1, dim, dtype=dtype, device=device)
    keys = randn(gen, batch, kv_heads, num_keys, dim, dtype=dtype, device=device)
    values = randn(gen, batch, kv_heads, num_keys, dim_v, dtype=dtype, device=device)
    n_blocks = -(-num_keys // chunk)
    scores = torch.rand(batch, kv_heads, n_blocks, generator=gen, dtype=torch.float64)
    blocks = ref.top_blocks(scores, [0, -1], min(k, n_blocks)).to(device)
    blocks[0, 0, -1] = -1  # a padded slot
    valid, bias = make_mask(mask_kind, gen, batch, q_heads, num_keys, device)
    out = triton_attention.sparse_attention(query, keys, values, blocks, valid, bias, chunk, 0.3, softcap)
    expected = ref.sparse_attention(query.double(), keys.double(), values.double(), blocks, valid, bias, chunk, 0.3, softcap)
    assert out.dtype == dtype and out.shape == (batch, q_heads, 1, dim_v)
    assert relative_error(out, expected) < TOLERANCE[dtype]


def test_attention_work_is_bounded_by_each_rows_selected_count(gen, device, real_sizes):
    """One selection shape (every block of the cache) with 0 to all entries >= 0 per row, -1
    after them: each row attends exactly its counted blocks, whatever the split count."""
    batch, kv_heads, groups, chunk, num_keys = 2, 2, 4, 16, 150
    if real_sizes:
        batch, kv_heads, chunk, num_keys = 4, 8, 128, 65_536
    dtype = torch.bfloat16 if real_sizes else torch.float32
    query = randn(gen, batch, kv_heads * groups, 1, 64, dtype=dtype, device=device)
    keys = randn(gen, batch, kv_heads, num_keys, 64, dtype=dtype, device=device)
    values = randn(gen, batch, kv_heads, num_keys, 64, dtype=dtype, device=device)
    n_blocks = -(-num_keys // chunk)
    counts = torch.randint(0, n_blocks + 1, (batch, kv_heads), generator=gen)
    counts[0, 0], counts[-1, -1] = n_blocks, 0
    blocks = torch.full((batch, kv_heads, n_blocks), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(kv_heads):
            blocks[b, h, : counts[b, h]] = torch.randperm(n_blocks, generator=gen)[: counts[b, h]].sort().values
    blocks = blocks.to(device)
    out = triton_attention.sparse_attention(query, keys, values, blocks, None, None, chunk, None, None)
    expected = ref.sparse_attention(query.double(), keys.double(), values.double(), blocks, None, None, chunk,
                                    None, None)
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert (out[-1, -groups:] == 0).all()  # a row with no selected block
    # The same first 4 entries of every row, padded to all blocks or not: same attention.
    wide = torch.where(torch.arange(n_blocks, device=device) < 4, blocks, -1)
    narrow = wide[..., :4].contiguous()
    full = triton_attention.sparse_attention(query, keys, values, wide, None, None, chunk, None, None)
    short = triton_attention.sparse_attention(query, keys, values, narrow, None, None, chunk, None, None)
    assert relative_error(full, short) < TOLERANCE[dtype]


def test_head_with_no_attendable_key_returns_zeros(gen, device):
    query = randn(gen, 1, 4, 1, 64, device=device)
    keys = randn(gen, 1, 2, 40, 64, device=device)
    values = randn(gen, 1, 2, 40, 64, device=device)
    blocks = torch.tensor([[[0, 2], [1, -1]]], dtype=torch.int32, device=device)
    valid = torch.ones(1, 40, dtype=torch.bool, device=device)
    valid[0, 16:32] = False  # block 1 of chunk 16: KV head 1 sees nothing
    out = triton_attention.sparse_attention(query, keys, values, blocks, valid, None, 16, None, None)
    expected = ref.sparse_attention(query, keys, values, blocks, valid, None, 16, None, None)
    assert torch.equal(out[:, 2:], torch.zeros_like(out[:, 2:]))
    assert relative_error(out, expected) < TOLERANCE[torch.float32]


def test_all_blocks_selected_equals_dense_sdpa(gen, device, real_sizes):
    num_keys = scaled(real_sizes, 70, 8200)
    query = randn(gen, 2, 8, 1, 64, dtype=torch.float16, device=device)
    keys = randn(gen, 2, 2, num_keys, 64, dtype=torch.float16, device=device)
    values = randn(gen, 2, 2, num_keys, 64, dtype=torch.float16, device=device)
    n_blocks = -(-num_keys // 16)
    blocks = torch.arange(n_blocks, dtype=torch.int32, device=device).expand(2, 2, n_blocks).contiguous()
    out = triton_attention.sparse_attention(query, keys, values, blocks, None, None, 16, None, None)
    dense = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float().repeat_interleave(4, 1), values.float().repeat_interleave(4, 1))
    assert relative_error(out, dense) < TOLERANCE[torch.float16]


# ------------------------------------------------------------------------------ dispatch
def test_dispatcher_routes_to_triton_and_declines_float64(device):
    query = torch.zeros(1, 4, 1, 64, device=device)
    keys = torch.zeros(1, 2, 32, 64, device=device)
    blocks = torch.zeros(1, 2, 1, dtype=torch.int32, device=device)
    with gsa_compile.use_backend("triton"):
        kernel = choose_kernel("sparse_attention", device, query, keys, keys, blocks, None, None, 16, None, None)
        assert kernel.backend == "triton"
        as_double = [t.double() for t in (query, keys, keys)]
        kernel = choose_kernel("sparse_attention", device, *as_double, blocks, None, None, 16, None, None)
        assert kernel.backend == "reference"
    assert "float64" in triton_attention.sparse_attention_supports(*as_double, blocks, None, None, 16, None, None)


def test_gsa_attention_through_the_ops_matches_reference(gen, device, real_sizes):
    num_keys = scaled(real_sizes, 200, 32_768 + 5)
    dtype = torch.bfloat16
    query = randn(gen, 2, 8, 1, 128, dtype=dtype, device=device)
    keys = randn(gen, 2, 2, num_keys, 128, dtype=dtype, device=device)
    values = randn(gen, 2, 2, num_keys, 128, dtype=dtype, device=device)
    weight = hash_weights(2, 128, 128, seed=9).to(device)
    mask = torch.ones(2, 1, 1, num_keys, dtype=torch.bool, device=device)
    mask[1, ..., : num_keys // 3] = False  # left padding of the second row
    chunk, budget = (128, 2048) if real_sizes else (16, 64)
    codes = ref.encode(keys, weight)
    with gsa_compile.use_backend("triton"):
        out, blocks = F.gsa_attention(query, keys, values, weight, key_codes=codes, chunk_size=chunk,
                                      budget_tokens=budget, attn_mask=mask, return_blocks=True)
    k = F.num_selected_blocks(num_keys, chunk, budget_tokens=budget)
    valid = mask[:, 0, 0]
    expected_blocks = ref.select_blocks(query, codes, weight, valid, None, chunk, k, [0, -2, -1], "max", "per_head")
    assert torch.equal(blocks[..., :k], expected_blocks) and (blocks[..., k:] == -1).all()
    expected = ref.sparse_attention(query.double(), keys.double(), values.double(), expected_blocks, valid, None,
                                    chunk, None, None)
    assert relative_error(out, expected) < TOLERANCE[dtype]


# ------------------------------------------------------------------------------ torch.compile
def test_decode_step_compiles_in_one_graph_without_recompiling(gen, device):
    """A masked decode step traces whole (no graph break) and new values of the same shapes
    reuse the graph. CPU uses aot_eager; GPU runs the CUDA-graph mode in the benchmark."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    weight = hash_weights(2, 64, 64, seed=4).to(device)
    keys = randn(gen, 2, 2, 96, 64, device=device)
    values = randn(gen, 2, 2, 96, 64, device=device)
    codes = ref.encode(keys, weight)
    mask = torch.ones(2, 1, 1, 96, dtype=torch.bool, device=device)
    mask[0, ..., :10] = False

    def step(query):
        return F.gsa_attention(query, keys, values, weight, key_codes=codes, chunk_size=16, budget_tokens=32,
                               attn_mask=mask, concurrency_threshold=1, seq_len_threshold=64)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with gsa_compile.use_backend("triton"):
        for _ in range(3):
            query = randn(gen, 2, 8, 1, 64, device=device)
            assert relative_error(compiled(query), step(query)) < 1e-6
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
