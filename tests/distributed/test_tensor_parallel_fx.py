"""The FX route under tensor parallelism, two CPU processes (gloo): a decoder whose attention
is split by heads (DTensor weights from parallelize_module, or a model built with local heads)
decodes what the whole model decodes, its sites holding their heads' rows of the hash weights."""

import pytest
import torch

from .conftest import WORLD, run_ranks

KV_HEADS = 4
CASES = [(budget, how) for budget in ("full_budget", "small_budget") for how in ("dtensor", "local_heads")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks("fx_tp_worker.py", tmp_path_factory.mktemp("fx_tp"))


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_sharded_decoder_decodes_like_the_whole_one(ranks, case):
    for rank in ranks:
        result = rank[case]
        assert result["sites"] > 0
        torch.testing.assert_close(result["logits"], result["whole_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_sites_hold_their_heads_rows(ranks, case):
    for index, rank in enumerate(ranks):
        result = rank[case]
        local = KV_HEADS // WORLD
        assert set(result["weights"]) == set(result["whole_weights"]) == {0, 1}
        for layer, weight in result["weights"].items():
            assert torch.equal(weight, result["whole_weights"][layer][index * local: (index + 1) * local])


def test_small_budget_selects(ranks):
    result = ranks[0][("small_budget", "dtensor")]
    assert (result["whole_logits"] - result["dense_logits"]).abs().max() > 1e-3
