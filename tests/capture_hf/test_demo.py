"""`gsa-compile demo` at small sizes: it runs through generate, its numbers are consistent."""

from __future__ import annotations

import argparse
import json

from gsa_compile.commands import demo

PROMPT, NEW, LAYERS, BUDGET = 2100, 4, 2, 384


def test_demo_runs_and_reports_consistent_numbers(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    out = tmp_path / "demo.json"
    args = parser.parse_args(["demo", "--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW), "--layers", str(LAYERS),
                              "--budget-tokens", str(BUDGET), "--device", "cpu", "--json", str(out)])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "expected time: about" in printed.splitlines()[0]  # said before anything runs
    assert "2 attention sites via hf_interface: 1 sparse, 0 reuse, 1 dense" in printed
    assert "decode tokens / s" in printed and "attention MB read / token" in printed
    result = json.loads(out.read_text())
    # The prompt is above the default CPU seq_len_threshold (2048): every decode step of the
    # selecting layers runs sparse; the first new token comes from the (dense) prefill.
    assert result["sparse_attention_calls"] == NEW - 1
    assert result["decode_threads"] == 1
    assert len(result["dense_tokens"]) == len(result["gsa_tokens"]) == NEW
    assert result["dense_tokens"][0] == result["gsa_tokens"][0]  # same prefill, same first token
    # generate's static cache holds PROMPT + NEW slots. A key of one KV head is 2 x 128 fp32
    # (1024 B) of K and V, and 16 B of codes; 4 KV heads. Dense reads every slot of both layers.
    # GSA: layer 0 reads every slot, layer 1 its codes and at most the budget's K and V.
    slots, kv_heads, per_key = PROMPT + NEW, 4, 1024
    assert result["dense_attention_bytes_per_token"] == LAYERS * kv_heads * slots * per_key
    floor = kv_heads * slots * per_key + kv_heads * slots * 16
    assert floor < result["gsa_attention_bytes_per_token"] <= floor + kv_heads * BUDGET * per_key


def test_demo_rejects_bad_sizes():
    import pytest

    from gsa_compile.errors import GSAConfigError

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    for flags in (["--new-tokens", "1"], ["--threads", "0"], ["--prompt-tokens", "0"]):
        args = parser.parse_args(["demo", *flags])
        with pytest.raises(GSAConfigError, match=flags[0]):
            args.handler(args)
