"""Compiled decode steps over static KV caches on the FX route: torch.compile(backend="gsa",
mode="reduce-overhead") and gsa_compile.optimize compile the prefill and the decode step once,
with no graph break, and each step writes the codes of its new keys only, into the buffer the
cache carries."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

import gsa_compile
from gsa_compile import GSAConfig, ops
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.capture.fx_examples import StaticCacheDecoder
from gsa_compile.passes.codes_state import static_codes_of

LAYERS, MAX_LEN, PROMPT, WARMUP, STEPS = 2, 48, 12, 2, 8
EXACT = dict(atol=1e-5, rtol=0)


def _config(**changes):
    fields = dict(num_hidden_layers=LAYERS, head_dim=8, hash_bits=16, chunk_size=4, budget_tokens=MAX_LEN,
                  top_k_ratio_per_layer=[0.5] * LAYERS,
                  must_select_blocks=[], cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
    fields.update(changes)
    return GSAConfig(**fields)


def _models(batch=2):
    torch.manual_seed(0)
    model = StaticCacheDecoder(layers=LAYERS, max_len=MAX_LEN, batch=batch).eval()
    reference = StaticCacheDecoder(layers=LAYERS, max_len=MAX_LEN, batch=batch).eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


def _decode(run, reference, model, ids, steps, codes=True):
    """Prefill, then one-token steps; checks each step against the eager model and (codes) the
    codes the caches carry against a fresh encode. Yields after each call."""
    logits = run(ids, torch.arange(ids.shape[1]))
    want = reference(ids, torch.arange(ids.shape[1]))
    torch.testing.assert_close(logits, want, **EXACT)
    position = ids.shape[1]
    for _ in range(steps):
        token = want[:, -1:].argmax(-1)
        logits = run(token, torch.tensor([position]))
        want = reference(token, torch.tensor([position]))
        torch.testing.assert_close(logits, want, **EXACT)
        for layer in model.layers if codes else ():
            entries = static_codes_of(layer.key_cache)
            assert entries, "the cache carries no codes"
            for entry in entries:
                torch.testing.assert_close(entry.buffer, ops.encode(layer.key_cache, entry.weight), rtol=0, atol=0)
        position += 1
        yield


def _graphs():
    return counters["stats"]["unique_graphs"]


def _check_no_recompile(run, model, reference, ids, codes=True):
    counters.clear()
    steps = _decode(run, reference, model, ids, WARMUP + STEPS, codes)
    for _ in range(WARMUP):
        next(steps)
    after_warmup = _graphs()
    for _ in steps:
        pass
    assert _graphs() == after_warmup, "a decode step recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    return after_warmup


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_reduce_overhead_compile_full_budget_equals_eager(grad):
    model, reference = _models()
    compiles = []

    def counting(gm, example_inputs, **kwargs):
        compiles.append(kwargs.get("mode"))
        return gsa_backend(gm, example_inputs, options={"config": _config(), "reports": reports}, **kwargs)

    reports = []
    torch._dynamo.reset()
    run = torch.compile(model, backend=counting, mode="reduce-overhead")
    ids = torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        graphs = _check_no_recompile(run, model, reference, ids)
    assert len(compiles) == graphs <= 3 and set(compiles) == {"reduce-overhead"}
    assert all(site.policy == "sparse" and site.note == "codes: index_copy" for report in reports
               for site in report.sites)
    assert sum(len(report.sites) for report in reports) == LAYERS * graphs


def test_backend_by_name_with_mode():
    """backend="gsa" with mode and a derived config (the default policy keeps both layers dense)."""
    model, reference = _models()
    torch._dynamo.reset()
    run = torch.compile(model, backend="gsa", mode="reduce-overhead")
    ids = torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _check_no_recompile(run, model, reference, ids, codes=False)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_optimize_static_decoder(grad):
    model, reference = _models()
    torch._dynamo.reset()
    optimized = gsa_compile.optimize(model, _config(), mode="reduce-overhead")
    assert optimized is model
    ids = torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.set_grad_enabled(grad):
        _check_no_recompile(model, model, reference, ids)
    handle = model.gsa
    assert handle.reports and all(site.policy == "sparse" for report in handle.reports for site in report.sites)
    # The whole (zero) caches once when the first graph was built, then the keys each call wrote.
    assert handle.codes.keys_encoded == LAYERS * 2 * 2 * (MAX_LEN + PROMPT + WARMUP + STEPS)
    handle.release()
    assert not hasattr(model, "gsa") and not static_codes_of(model.layers[0].key_cache)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.arange(PROMPT)), reference(ids, torch.arange(PROMPT)), **EXACT)


def test_small_budget_differs_from_dense():
    model, reference = _models()
    torch._dynamo.reset()
    run = torch.compile(model, backend=functools.partial(gsa_backend, options={"config": _config(budget_tokens=8)}),
                        mode="reduce-overhead")
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        run(ids, torch.arange(40))
        reference(ids, torch.arange(40))
        token = torch.randint(0, 64, (2, 1))
        got, want = run(token, torch.tensor([40])), reference(token, torch.tensor([40]))
    assert (got - want).abs().max() > 1e-3


def test_backward_through_a_rewritten_site_says_why_not():
    model, _ = _models()
    torch._dynamo.reset()
    run = torch.compile(model, backend=functools.partial(gsa_backend, options={"config": _config()}))
    ids = torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    logits = run(ids, torch.arange(PROMPT))  # grad enabled: the forward compiles and runs
    assert logits.requires_grad
    with pytest.raises(gsa_compile.GSAError, match="inference-only"):
        logits.sum().backward()
