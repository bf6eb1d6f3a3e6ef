"""The torch.compile backend (entry point, options, compilers), optimize, inspect, export of a
decode-shaped program and the `gsa-compile inspect` command."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import gsa_compile
from gsa_compile import GSAConfig, GSAConfigError
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.capture.fx_examples import TinyDecoder
from gsa_compile.cli import main

EXACT = dict(atol=1e-5, rtol=0)


def _config(layers=1, head_dim=16, **changes):
    fields = dict(num_hidden_layers=layers, head_dim=head_dim, hash_bits=16, chunk_size=4,
                  top_k_ratio_per_layer=[0.999] * layers, must_select_blocks=[], cpu_seq_len_threshold=0,
                  cpu_concurrency_threshold=0)
    fields.update(changes)
    return GSAConfig(**fields)


class Decode(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _decode_inputs(keys=64):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 1, 16, generator=generator), torch.randn(1, 2, keys, 16, generator=generator),
            torch.randn(1, 2, keys, 16, generator=generator))


def test_backend_name_works_without_importing_gsa_compile():
    script = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        assert "gsa_compile" not in sys.modules
        reports = []
        out = torch.compile(fn, backend="gsa", options={"compiler": "eager", "reports": reports})(q, k, v)
        assert "gsa_compile" in sys.modules and reports[0].counts()["sparse"] == 1, reports
        torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("options, message", [
    ({"compiler": "tvm"}, "compiler must be one of"),
    ({"budget": 3}, "unknown gsa backend option"),
    ({"config": 3}, "config must be a GSAConfig"),
])
def test_bad_options_name_the_problem(options, message):
    graph_module = torch.fx.symbolic_trace(Decode())
    with pytest.raises(GSAConfigError, match=message):
        gsa_backend(graph_module, list(_decode_inputs()), options=options)


@pytest.mark.parametrize("compiler, ratios", [("aot_eager", (0.999, 0.25)), ("inductor", (0.999,))])
def test_rewritten_graph_runs_under_compilers(compiler, ratios):
    module, inputs = Decode(), _decode_inputs()
    for ratio in ratios:
        torch._dynamo.reset()
        options = {"config": _config(top_k_ratio_per_layer=[ratio]), "compiler": compiler}
        with torch.no_grad():
            out = torch.compile(module, backend="gsa", options=options)(*inputs)
        if ratio > 0.99:
            torch.testing.assert_close(out, module(*inputs), **EXACT)
        else:
            assert (out - module(*inputs)).abs().max() > 1e-3


def _generate(model, ids, steps):
    cache = model.empty_cache()
    logits, cache = model(ids, cache)
    outputs = [logits]
    for _ in range(steps):
        logits, cache = model(logits[:, -1:].argmax(-1), cache)
        outputs.append(logits)
    return outputs


def test_optimize_plain_module_is_used_like_the_original():
    torch.manual_seed(0)
    model = TinyDecoder(layers=2).eval()
    reference = TinyDecoder(layers=2).eval()
    reference.load_state_dict(model.state_dict())
    optimized = gsa_compile.optimize(model, _config(layers=2, head_dim=8), compiler="eager")
    assert optimized is model
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        for got, want in zip(_generate(optimized, ids, 2), _generate(reference, ids, 2)):
            torch.testing.assert_close(got, want, **EXACT)
    assert optimized.gsa.reports and len(optimized.gsa.reports[0].sites) == 2
    assert optimized.gsa.codes.keys_encoded == 2 * 2 * (12 + 2)


def test_optimize_with_a_config_for_another_model_fails_clearly():
    model = TinyDecoder(layers=3).eval()
    gsa_compile.optimize(model, _config(layers=2, head_dim=8), compiler="eager")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="has num_hidden_layers=2"):
        with torch.no_grad():
            model(torch.randint(0, 64, (1, 8)), model.empty_cache())


def test_optimize_hands_transformers_models_to_the_hf_route(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from gsa_compile.capture import hf

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    monkeypatch.setattr(hf, "optimize_transformers", lambda m, c: ("hf route", m, c))
    assert gsa_compile.optimize(model, "cfg") == ("hf route", model, "cfg")


def test_export_decode_program_keeps_codes_beside_the_growing_cache():
    torch.manual_seed(0)
    model = TinyDecoder(layers=2).eval()
    prompt = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = model(prompt, model.empty_cache())
    token = torch.randint(0, 64, (1, 1))
    program = gsa_compile.export(model, (token, cache), config=_config(layers=2, head_dim=8, budget_tokens=16))
    assert [site.note for site in program.gsa_report.sites] == ["codes: cat"] * 2
    runner = program.module()
    state = program.gsa_codes_state
    with torch.no_grad(), state.active():
        got, new_cache = runner(token, cache)
        want, _ = model(token, cache)
    torch.testing.assert_close(got, want, **EXACT)
    # First call: the cached prompt's keys once, plus the new key.
    assert state.keys_encoded == 2 * 2 * (12 + 1)


def test_inspect_reports_without_modifying():
    torch.manual_seed(0)
    model = TinyDecoder(layers=2).eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    report = gsa_compile.inspect(model, torch.randint(0, 64, (1, 8)), model.empty_cache())
    assert [site.module_path for site in report.sites] == ["layers.0", "layers.1"]
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


@pytest.mark.parametrize("model", ["decoder_manual", "gpt2", "multihead"])
def test_inspect_command(model, capsys):
    assert main(["inspect", model, "--layers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "attention sites via inspect" in printed
    if model == "multihead":  # one call without attention weights (a site), one with them (left dense)
        assert "1 attention sites" in printed and "multihead_attention  first" in printed
        assert "left dense: second" in printed and "need_weights" in printed
    else:
        assert "2 attention sites" in printed


def test_inspect_command_names_an_unknown_model_briefly(capsys):
    assert main(["inspect", "lama"]) == 2
    assert re.search(r"'lama' is neither a transformers model type .* did you mean llama", capsys.readouterr().err)



def test_config_by_shipped_name():
    """The name resolves to the shipped config, which a whole graph of another depth refuses."""
    torch._dynamo.reset()
    model = TinyDecoder(layers=3).eval()
    with pytest.raises(Exception, match=r"3 attention sites .* 'Qwen/Qwen3-4B' has num_hidden_layers=36"):
        with torch.no_grad():
            torch.compile(model, backend="gsa", options={"config": "Qwen/Qwen3-4B", "compiler": "eager"})(
                torch.randint(0, 64, (1, 8)), model.empty_cache())
