"""The accuracy benchmark: selectors against brute force, and a reduced grid end to end."""

import json

import pytest
import torch

from gsa_compile import functional
from gsa_compile.accuracy.selectors import ExactSelector, GSASelector, QuestSelector, WindowSelector
from gsa_compile.cli import main


@pytest.fixture
def decode_case():
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 4, 1, 32, generator=generator)
    key = torch.randn(2, 2, 100, 32, generator=generator)
    return query, key


def test_exact_selector_takes_the_block_of_the_best_key(decode_case):
    query, key = decode_case
    blocks = ExactSelector().select(0, query, key, 10, 3, [0])
    dots = torch.einsum("bhgd,bhld->bhl", query.reshape(2, 2, 2, 32), key)
    best_block = dots.argmax(-1) // 10
    for row in range(2):
        for head in range(2):
            assert 0 in blocks[row, head].tolist()
            assert int(best_block[row, head]) in blocks[row, head].tolist()


def test_quest_bound_is_an_upper_bound_of_every_key_in_the_block(decode_case):
    query, key = decode_case
    bound = QuestSelector().block_scores(0, query, key, 10)
    dots = torch.einsum("bhgd,bhld->bhgl", query.reshape(2, 2, 2, 32), key)
    best_in_block = dots.reshape(2, 2, 2, 10, 10).amax(-1).sum(2)
    assert torch.all(bound >= best_in_block - 1e-5)


def test_window_selector_keeps_sink_and_recent_blocks(decode_case):
    query, key = decode_case
    blocks = WindowSelector().select(0, query, key, 16, 4, [0, -1])
    assert blocks[0, 0].tolist() == [0, 4, 5, 6]


def test_gsa_selector_with_prefill_codes_matches_a_fresh_encode(decode_case):
    query, key = decode_case
    weight = functional.hash_weights(2, 32, 32, seed=1)
    selector = GSASelector("gsa_random", {0: weight})
    selector.on_prefill(0, key[:, :, :90])
    blocks = selector.select(0, query, key, 10, 4, [0, -1])
    fresh = functional.select_blocks(query, functional.encode(key, weight), weight, chunk_size=10, num_blocks=4, must_select=[0, -1])
    assert torch.equal(blocks, fresh)


def test_reduced_grid_writes_json_and_plot_and_full_budget_equals_dense(tmp_path, capsys):
    out = tmp_path / "acc.json"
    code = main([
        "eval", "--lengths", "160", "--tasks", "kv", "--samples", "2", "--budgets", "0.1,1.0",
        "--chunk-size", "16", "--calib-len", "128", "--calib-samples", "1", "--epochs", "1", "--iterations", "2", "--json", str(out),
    ])
    assert code == 0
    results = json.loads(out.read_text())
    assert (tmp_path / "acc.png").stat().st_size > 0
    rules = {cell["rule"] for cell in results["accuracy"]}
    assert rules == {"dense", "gsa_random", "gsa_trained", "exact", "quest", "window"}
    dense = {cell["task"]: cell["accuracy"] for cell in results["accuracy"] if cell["rule"] == "dense"}
    for cell in results["accuracy"]:
        if cell["budget"] == 1.0:  # every block selected: attention equals dense
            assert cell["accuracy"] == dense[cell["task"]]
    full = [entry for entry in results["attention"] if entry["budget"] == 1.0]
    assert full and all(abs(e["attention_mass"] - 1) < 1e-5 and e["output_rel_error"] < 1e-4 for e in full)
    partial = [entry for entry in results["attention"] if entry["budget"] == 0.1]
    assert all(e["attention_mass"] < 1 for e in partial)
    printed = capsys.readouterr().out
    assert "gsa_trained" in printed
    assert "s in all including calibration)" in printed  # the total counts the calibration run first
