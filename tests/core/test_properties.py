"""Property tests (hypothesis): the functional API and every backend that runs on CPU (reference,
cpu, triton under TRITON_INTERPRET=1) against a brute-force oracle, over random shapes, dtypes,
masks, budgets and must-select lists (duplicates, out of range, empty), fully masked rows and
non-finite values. Example counts are bounded so the file stays well under a minute."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gsa_compile
from gsa_compile import GSAInputError
from gsa_compile import functional as gsa
from gsa_compile.kernels import reference as ref
from gsa_compile.kernels import validation

from . import brute_force

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
# Per-element tolerance against the float64 oracle: the output's own rounding plus low-precision
# probabilities inside the kernels.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_matches(out, expected, dtype):
    out = out.double()
    # NaN and inf positions must agree exactly; finite values to the dtype's rounding.
    assert torch.equal(out.isnan(), expected.isnan()), (out, expected)
    finite = expected.isfinite()
    assert torch.equal(out[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()])
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out[finite], expected[finite], atol=tol * 10, rtol=tol * 10)


@st.composite
def sparse_case(draw, dtypes):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    chunk = draw(st.integers(1, 6))
    length = draw(st.integers(1, 20))
    dim = draw(st.sampled_from([4, 8]))
    dim_v = draw(st.sampled_from([4, 8]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim_v, generator=gen)
    n_blocks = math.ceil(length / chunk)
    slots = draw(st.integers(1, n_blocks + 1))
    rows = []
    for _ in range(batch * kv_heads):
        ids = draw(st.lists(st.integers(0, n_blocks - 1), unique=True, max_size=min(slots, n_blocks)))
        rows.append(ids + [-1] * (slots - len(ids)))
    blocks = torch.tensor(rows, dtype=torch.int32).reshape(batch, kv_heads, slots)
    valid = None
    if draw(st.booleans()):
        valid = torch.rand(batch, length, generator=gen) < draw(st.sampled_from([0.0, 0.5, 0.9]))
    bias = None
    if draw(st.booleans()):
        bias = torch.randn(batch, draw(st.sampled_from([1, kv_heads * groups])), 1, length, generator=gen)
        bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.2, float("-inf"))
    poison = draw(st.sampled_from(["none", "nan_query", "nan_key", "inf_value", "nan_outside"]))
    if poison == "nan_query":
        q[0, draw(st.integers(0, q.shape[1] - 1)), 0, 0] = float("nan")
    elif poison in ("nan_key", "inf_value"):
        target = k if poison == "nan_key" else v
        target[0, 0, draw(st.integers(0, length - 1)), 0] = float("nan") if poison == "nan_key" else float("inf")
    elif poison == "nan_outside":
        unselected = sorted(set(range(n_blocks)) - set(blocks[0, 0].tolist()))
        for c in unselected:
            k[0, 0, c * chunk:(c + 1) * chunk] = float("nan")
            v[0, 0, c * chunk:(c + 1) * chunk] = float("inf")
    softcap = draw(st.sampled_from([None, 3.0]))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    bias = None if bias is None else bias.to(dtype if dtype != torch.float64 else torch.float32)
    return dict(q=q, k=k, v=v, blocks=blocks, valid=valid, bias=bias, chunk=chunk, softcap=softcap, dtype=dtype)


def _expected(case):
    selected = [[[c for c in row if c >= 0] for row in heads] for heads in case["blocks"].tolist()]
    # The oracle reads the inputs as the kernels see them (rounded to the dtype).
    return brute_force.attention(case["q"], case["k"], case["v"], selected, chunk=case["chunk"], valid=case["valid"],
                                 bias=case["bias"], softcap=case["softcap"])


def _op(case):
    return torch.ops.gsa.sparse_attention(case["q"], case["k"], case["v"], case["blocks"], case["valid"], case["bias"],
                                          case["chunk"], None, case["softcap"])


ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@settings(max_examples=80, **SETTINGS)
@given(case=sparse_case(ALL_DTYPES))
def test_reference_and_cpu_sparse_attention_match_the_oracle(case):
    expected = _expected(case)
    validation.check_sparse_attention(case["q"], case["k"], case["v"], case["blocks"], case["valid"], case["bias"],
                                      case["chunk"])
    reference = ref.sparse_attention(case["q"], case["k"], case["v"], case["blocks"], case["valid"], case["bias"],
                                     case["chunk"], None, case["softcap"])
    assert_matches(reference, expected, case["dtype"])
    with gsa_compile.use_backend("cpu"):
        assert_matches(_op(case), expected, case["dtype"])


@settings(max_examples=12, **SETTINGS)
@given(case=sparse_case([torch.float32, torch.float16]))
def test_triton_sparse_attention_matches_the_oracle(case):
    pytest.importorskip("triton")
    with gsa_compile.use_backend("triton"):
        assert_matches(_op(case), _expected(case), case["dtype"])


@settings(max_examples=40, **SETTINGS)
@given(case=sparse_case([torch.float32]), corruption=st.sampled_from(["duplicate", "too_large", "below", "gap"]),
       backend=st.sampled_from(["cpu", "triton"]))
def test_invalid_block_ids_are_refused_by_every_backend(case, corruption, backend):
    blocks = case["blocks"].clone()
    n_blocks = math.ceil(case["k"].shape[2] / case["chunk"])
    row = blocks[0, 0]
    if corruption == "duplicate":
        row[:] = -1
        if blocks.shape[-1] < 2:
            blocks = torch.cat([blocks, blocks], dim=-1)
            row = blocks[0, 0]
        row[0] = row[1] = n_blocks - 1
    elif corruption == "too_large":
        row[0] = n_blocks
    elif corruption == "below":
        row[0] = -2
    else:
        blocks = torch.cat([torch.full_like(blocks[..., :1], -1), blocks], dim=-1)
        blocks[0, 0, 1] = 0
    if backend == "triton":
        pytest.importorskip("triton")
    with gsa_compile.use_backend(backend), pytest.raises(GSAInputError, match="blocks"):
        gsa.sparse_attention(case["q"], case["k"], case["v"], blocks, chunk_size=case["chunk"], valid=case["valid"])


@st.composite
def site_case(draw):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 2))
    chunk = draw(st.integers(1, 5))
    length = draw(st.integers(1, 18))
    dim = draw(st.sampled_from([4, 8]))
    bits = draw(st.sampled_from([8, 16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    n_blocks = math.ceil(length / chunk)
    must = draw(st.lists(st.integers(-n_blocks - 2, n_blocks + 2), max_size=4))  # duplicates, out of range
    budget = draw(st.one_of(
        st.builds(lambda r: {"top_k_ratio": r}, st.floats(0.01, 1.5)),
        st.builds(lambda t: {"budget_tokens": t}, st.integers(1, 2 * length)),
    ))
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "empty_row"]))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, 1, length, generator=gen) < 0.7
    elif mask_kind == "float":
        mask = torch.randn(batch, 1, 1, length, generator=gen, dtype=torch.float64)
        mask = mask.masked_fill(torch.rand(mask.shape, generator=gen) < 0.3, float("-inf"))
    elif mask_kind == "empty_row":
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        mask[-1] = False
    return dict(q=q, k=k, v=v, chunk=chunk, bits=bits, must=must, budget=budget, mask=mask,
                repre=draw(st.sampled_from(["max", "min", "sum"])), norms=draw(st.booleans()),
                scope=draw(st.sampled_from(["per_head", "shared"])), seed=draw(st.integers(0, 100)))


@settings(max_examples=60, **SETTINGS)
@given(case=site_case())
def test_gsa_attention_matches_brute_force_selection_and_attention(case):
    q, k, v, chunk = case["q"], case["k"], case["v"], case["chunk"]
    kv_heads, length = k.shape[1], k.shape[2]
    weight = gsa.hash_weights(kv_heads, k.shape[-1], case["bits"], seed=case["seed"])
    norms = gsa.key_norms(k) if case["norms"] else None
    out, blocks = gsa.gsa_attention(
        q, k, v, weight, chunk_size=chunk, must_select=case["must"], repre=case["repre"], attn_mask=case["mask"],
        key_norms=norms, scope=case["scope"], return_blocks=True, **case["budget"],
    )
    num = gsa.num_selected_blocks(length, chunk, must_select=case["must"], **case["budget"])
    mask = case["mask"]
    valid, bias = None, None
    if mask is not None:
        valid = (mask if mask.dtype == torch.bool else mask > float("-inf"))[:, 0, 0, :]
        bias = None if mask.dtype == torch.bool else mask
    selected = brute_force.select(q, k, weight, chunk=chunk, k=num, must=case["must"], repre=case["repre"],
                                  valid=valid, norms=case["norms"], shared=case["scope"] == "shared")
    got = [[[c for c in row if c >= 0] for row in heads] for heads in blocks.tolist()]
    assert got == selected
    assert_matches(out, brute_force.attention(q, k, v, selected, chunk=chunk, valid=valid, bias=bias), torch.float64)


@settings(max_examples=25, **SETTINGS)
@given(case=site_case(), backend=st.sampled_from(["cpu", "triton"]))
def test_every_backend_selects_what_the_reference_selects(case, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    q, k = case["q"].float(), case["k"].float()
    weight = gsa.hash_weights(k.shape[1], k.shape[-1], case["bits"], seed=case["seed"])
    codes = ref.encode(k, weight)
    num = gsa.num_selected_blocks(k.shape[2], case["chunk"], must_select=case["must"], **case["budget"])
    valid = None if case["mask"] is None or case["mask"].dtype != torch.bool else case["mask"][:, 0, 0, :]
    args = (q, codes, weight, valid, None, case["chunk"], num, case["must"], case["repre"], case["scope"])
    expected = ref.select_blocks(*args)
    with gsa_compile.use_backend(backend):
        assert torch.equal(torch.ops.gsa.select_blocks(*args), expected)
