"""The decode plan (gsa_compile.decode): dense-fallback rules decided once per step, on the host
from shapes, from mask values on CPU, and on the device elsewhere (simulated here by declaring
CPU tensors unreadable, as CUDA tensors are)."""

import pytest
import torch

from gsa_compile import decode
from gsa_compile.kernels import common


def _query(batch=2, heads=4, tokens=1, dim=16):
    return torch.randn(batch, heads, tokens, dim)


def _plan(valid=None, **kwargs):
    mask = None if valid is None else valid[:, None, None, :]
    options = dict(is_causal=False, chunk_size=16, seq_len_threshold=0, concurrency_threshold=0)
    options.update(kwargs)
    return decode.plan_decode(_query(), 70, mask, options.pop("is_causal"), **options)


def _valid_with_short_row():
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[1, :40] = False  # row 1 holds 30 keys (left padding)
    return valid


def test_host_rules_from_shapes():
    assert decode.plan_decode(_query(tokens=3), 70, None, False, 16, 0, 0).dense == "prefill"
    assert _plan(is_causal=True).dense == "causal_single_query"
    assert _plan(seq_len_threshold=71).dense == "short"
    assert _plan(concurrency_threshold=3).dense == "concurrency"
    assert _plan(seq_len_threshold=50, concurrency_threshold=2).dense is None


def test_mask_rules_read_on_cpu():
    valid = _valid_with_short_row()
    assert _plan(valid, seq_len_threshold=50, concurrency_threshold=2).dense == "concurrency"
    assert _plan(valid, seq_len_threshold=50, concurrency_threshold=1).dense is None
    tail = torch.zeros(2, 70, dtype=torch.bool)
    tail[:, :40] = True  # a static cache filled to 40 of 70 slots
    assert _plan(tail, seq_len_threshold=50).dense == "short"


@pytest.fixture
def device_side(monkeypatch):
    monkeypatch.setattr(decode, "is_host_readable", lambda t: False)


def test_mask_rules_stay_on_the_device(device_side):
    valid = _valid_with_short_row()
    plan = _plan(valid, seq_len_threshold=50, concurrency_threshold=2)
    assert plan.dense == "device" and bool(plan.dense_on_device) and not bool(plan.short_on_device)
    # Dense on the device: every filled block of each row (5 blocks of 16 cover 70 keys).
    assert plan.limit(None, 32, [0, -1]).tolist() == [5, 5]
    sparse = _plan(valid, seq_len_threshold=50, concurrency_threshold=1)
    assert not bool(sparse.dense_on_device)
    assert sparse.limit(None, 32, [0, -1]).tolist() == [2, 2]
    assert sparse.num_blocks(None, 32, [0, -1]) == 5  # the width: rows stop at their limit


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("must_select", [(), (0,), (0, -2, -1), (0, 0, -1, 99, -99)])
def test_row_budget_matches_the_host_rule(ratio, must_select):
    lengths = torch.tensor([1, 15, 16, 17, 70, 160, 1000])
    got = decode.row_budget(lengths, 16, ratio, None, must_select).tolist()
    want = [common.num_selected_blocks(int(n), 16, top_k_ratio=ratio, must_select=must_select) for n in lengths]
    assert got == want
    got = decode.row_budget(lengths, 16, None, 40, must_select).tolist()
    want = [common.num_selected_blocks(int(n), 16, budget_tokens=40, must_select=must_select) for n in lengths]
    assert got == want


def test_every_filled_block_stops_at_each_rows_last_valid_key(device_side):
    valid = torch.zeros(2, 70, dtype=torch.bool)
    valid[0, :20] = True
    valid[1, 5:40] = True
    plan = _plan(valid)
    blocks = decode.every_filled_block(plan, 2, 3, torch.device("cpu"))
    assert blocks.shape == (2, 3, 5)
    assert blocks[0, 0].tolist() == [0, 1, -1, -1, -1] and blocks[1, 2].tolist() == [0, 1, 2, -1, -1]


def test_truncate_by_host_width_or_device_limit():
    blocks = torch.tensor([[[0, 3, 4, -1]]], dtype=torch.int32)
    assert decode.truncate(blocks, 2, None).tolist() == [[[0, 3]]]
    assert decode.truncate(blocks, 4, torch.tensor([2], dtype=torch.int32)).tolist() == [[[0, 3, -1, -1]]]
