"""The FX coverage sweep (benchmarks/coverage_fx.py) on a CI-size sample: one architecture
through build, sizing from the graph, the gsa backend and the comparison with eager."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import coverage_fx  # noqa: E402


def test_sweep_sample_writes_json_and_table(tmp_path):
    out, table = tmp_path / "coverage_fx.json", tmp_path / "coverage_fx.md"
    coverage_fx.main(["--models", "llama", "--compiler", "aot_eager", "--timeout", "300", "--out", str(out),
                      "--table", str(table)])
    result = json.loads(out.read_text())["models"]["llama"]
    assert result["status"] == "pass", result
    assert result["sites"] == 2 and result["sparse_sites"] == 2
    assert result["prefill_diff"] <= coverage_fx.ATOL and result["decode_diff"] <= coverage_fx.ATOL
    text = table.read_text()
    assert "**1 of 1 buildable architectures pass**" in text and "| llama | pass | 2 (2) |" in text


def test_failures_group_by_their_generalised_error():
    results = {
        "a": {"model": "a", "status": "error", "stage": "prefill", "error": "AssertionError: stride 16==256 at dim=1"},
        "b": {"model": "b", "status": "error", "stage": "prefill", "error": "AssertionError: stride 8==64 at dim=2"},
        "c": {"model": "c", "status": "pass"},
        "d": {"model": "d", "status": "unbuildable", "stage": "build", "error": "KeyError: 'x'"},
        "e": {"model": "e", "status": "dense", "error": "no attention site; left dense: attention sinks"},
        "f": {"model": "f", "status": "no_attention", "error": "no softmax of a product in the graph"},
    }
    totals = coverage_fx.summary(results)
    assert (totals["passed"], totals["buildable"], totals["unbuildable"]) == (1, 5, 1)
    assert (totals["dense"], totals["no_attention"]) == (1, 1)
    assert totals["failure_groups"] == {
        "prefill: AssertionError: stride N==N at dim=N": ["a", "b"],
        "equal to eager, left dense: no candidate provable (reasons in the table below)": ["e"],
    }
