"""`gsa-compile demo` at tiny sizes: it runs, its numbers are consistent, its CLI parses."""

from __future__ import annotations

import argparse
import json

from gsa_compile.commands import demo


def test_demo_runs_and_reports_consistent_numbers(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    out = tmp_path / "demo.json"
    args = parser.parse_args(["demo", "--prompt-tokens", "640", "--new-tokens", "5", "--layers", "3",
                              "--budget-tokens", "384", "--json", str(out)])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "3 attention sites via hf_interface: 2 sparse, 0 reuse, 1 dense" in printed
    assert "attention MB read / token" in printed
    result = json.loads(out.read_text())
    assert result["sparse_attention_calls"] == 2 * 4  # stats count the free-running GSA decode only
    assert 1 <= result["next_token_agreeing_on_dense_history"] <= 5
    assert len(result["dense_tokens"]) == len(result["gsa_tokens"]) == 5
    assert result["dense_tokens"][0] == result["gsa_tokens"][0]  # same prefill, same first token
    # The static cache holds 645 slots: 6 blocks of 128, the last partial. Budget 384 = 3 blocks =
    # the must-select blocks 0, 4 and 5, i.e. 128 + 128 + 5 slots. A key of one KV head is 2 x 128
    # fp32 (1024 B) of K and V, and 16 B of codes. 4 KV heads; layer 0 dense, layers 1-2 selecting.
    dense = 3 * 4 * 645 * 1024
    gsa = 4 * 645 * 1024 + 2 * 4 * (261 * 1024 + 645 * 16)
    assert result["dense_attention_bytes_per_token"] == dense
    assert result["gsa_attention_bytes_per_token"] == gsa
