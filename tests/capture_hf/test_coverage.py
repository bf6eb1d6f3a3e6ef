"""A sample of the coverage sweep (benchmarks/coverage.py), one architecture per kind of
attention the HF route meets: each must give the original model's greedy tokens at full budget
and run sparse at a small one, or be dense or refused for the reason it states."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _coverage():
    spec = importlib.util.spec_from_file_location("coverage_sweep", os.path.join(ROOT, "benchmarks", "coverage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


coverage = _coverage()
CLASSES = dict(coverage.architectures())

# model type -> (outcome, what its reason must say)
SAMPLE = {
    "llama": ("pass", ""),
    "qwen3_next": ("pass", ""),  # full attention every 4th layer, beside DeltaNet layers
    "bart": ("pass", ""),  # decoder with cross-attention
    "gpt_oss": ("pass", ""),  # attention sinks, added by the sparse path
    "deepseek_v32": ("dense", "own indexer"),
    "bloom": ("refused", "AttentionInterface"),
}


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_sweep_sample(model_type):
    status, reason = SAMPLE[model_type]
    result = coverage.check_hf(model_type, CLASSES[model_type])
    assert result["status"] == status, result
    assert reason in result.get("reason", ""), result
    if status != "refused":
        assert result["tokens_equal"], result


def test_summary_and_table(tmp_path):
    results = {
        "a": {"status": "pass", "class": "A", "dense_reasons": []},
        "b": {"status": "dense", "class": "B", "reason": "attention sinks"},
        "c": {"status": "fail", "class": "C", "reason": "silently dense: layers [1]"},
        "d": {"status": "unbuildable", "class": "D", "reason": "no such package"},
    }
    totals = coverage.totals(results)
    assert (totals["buildable"], totals["pass"], totals["dense"], totals["fail"]) == (3, 1, 1, 1)
    assert totals["pass_or_stated_dense_percent"] == pytest.approx(66.7)
    path = tmp_path / "coverage.md"
    coverage.write_markdown(str(path), results, {"results": {"a": {"status": "pass"}}})
    text = path.read_text()
    assert "| c | C | fail | silently dense: layers [1] | - |  |" in text
    assert "pass or dense by a stated reason: 2 (66.7%); of the 3 whose attention" in text
