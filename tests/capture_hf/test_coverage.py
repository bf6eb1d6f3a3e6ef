"""A sample of the coverage sweep (benchmarks/coverage.py), one architecture per kind of
attention the HF route meets: each must give the original model's greedy tokens at full budget
and run sparse at a small one, or be dense for the reason it states, through the route
`gsa_compile.optimize` takes for it."""

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

# model type -> (outcome, what its reason must say, route)
SAMPLE = {
    "llama": ("pass", "", "hf"),
    "qwen3_next": ("pass", "", "hf"),  # full attention every 4th layer, beside DeltaNet layers
    "bart": ("pass", "", "hf"),  # decoder with cross-attention
    "gpt_oss": ("pass", "", "hf"),  # attention sinks, added by the sparse path
    "deepseek_v32": ("dense", "own indexer", "hf"),
    "bloom": ("pass", "", "fx"),  # attention not through the AttentionInterface
}


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_sweep_sample(model_type):
    status, reason, route = SAMPLE[model_type]
    # The FX route's check with the eager compiler: Inductor's compile time is no test's business.
    result = coverage.check_model(model_type, CLASSES[model_type], fx_compiler="eager")
    assert (result["status"], result["route"]) == (status, route), result
    assert reason in result.get("reason", ""), result
    assert result["tokens_equal"], result
    if status == "pass":
        assert result["sparse_calls"] > 0, result


def test_summary_and_table(tmp_path):
    results = {
        "a": {"status": "pass", "class": "A", "dense_reasons": [], "route": "hf"},
        "b": {"status": "dense", "class": "B", "reason": "own indexer", "route": "hf"},
        "c": {"status": "fail", "class": "C", "reason": "silently dense: layers [1]", "route": "fx"},
        "d": {"status": "unbuildable", "class": "D", "reason": "no such package"},
    }
    totals = coverage.totals(results)
    assert (totals["buildable"], totals["pass"], totals["dense"], totals["fail"]) == (3, 1, 1, 1)
    assert totals["pass_or_stated_dense_percent"] == pytest.approx(66.7)
    assert totals["by_route"] == {"fx": {"fail": 1}, "hf": {"dense": 1, "pass": 1}}
    path = tmp_path / "coverage.md"
    coverage.write_markdown(str(path), results, {"results": {"a": {"status": "pass"}}})
    text = path.read_text()
    assert "| c | C | fx | fail | silently dense: layers [1] | - |  |" in text
    assert "pass or dense by a stated reason: 2 (66.7%). By the route" in text
