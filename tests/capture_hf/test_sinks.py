"""Attention sinks (`s_aux`: gpt-oss, Granite-SWA, ...) on the HF route's sparse path: at full
budget the decode logits are the eager model's with its sinks; at a small budget the sparse path
runs; sinks of another shape than one logit per query head keep the call dense with the reason."""

from __future__ import annotations

import copy

import pytest
import torch

from gsa_compile.capture.hf import optimize_transformers
from gsa_compile.capture.hf_attention import plain_attention_reason

from .helpers import decode_logits
from .test_coverage import CLASSES, coverage

STEPS = 4


def _with_large_sinks(model_type):
    model = coverage.build(model_type, CLASSES[model_type])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                # Sinks well inside the logits' range, so their term moves every output.
                module.sinks.copy_(torch.linspace(-1.0, 3.0, module.sinks.numel()))
    return model


def _prompt(length=40):
    return torch.randint(3, coverage.VOCAB, (1, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("model_type", ["gpt_oss", "granite_swa"])
def test_sinks_run_sparse_and_equal_eager_at_full_budget(model_type):
    original = _with_large_sinks(model_type)
    full, small = coverage.gsa_configs(original)
    model = optimize_transformers(copy.deepcopy(original), full)
    assert model.gsa_report.counts()["sparse"] > 0
    expected, _ = decode_logits(original, _prompt(), STEPS)
    got, _ = decode_logits(model, _prompt(), STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.gsa_runtime.total_stats().sparse_calls > 0

    # The sinks matter here: without them the model decodes other logits.
    no_sinks = copy.deepcopy(original)
    for module in no_sinks.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            module.sinks.data.fill_(-float("inf"))
    plain, _ = decode_logits(no_sinks, _prompt(), STEPS)
    assert (plain - expected).abs().max() > 1e-3

    model = optimize_transformers(model, small)
    decode_logits(model, _prompt(80), STEPS)
    assert model.gsa_runtime.total_stats().sparse_calls > 0


def test_sinks_of_another_shape_stay_dense_with_the_reason():
    original = _with_large_sinks("gpt_oss")
    model = optimize_transformers(original, coverage.gsa_configs(original)[0])
    site = next(site for site in model.gsa_runtime.sites.values() if site.policy == "sparse")
    module = next(m for m in model.modules() if getattr(m, "gsa_site", None) is site)
    query = torch.zeros(1, 4, 1, 16)
    assert plain_attention_reason(site, module, None, 0.0, {"s_aux": torch.zeros(4)}, query) is None
    per_token = plain_attention_reason(site, module, None, 0.0, {"sinks": torch.zeros(1, 4, 1, 1)}, query)
    assert per_token == ("unsupported_kwarg",
                         "sinks of shape (1, 4, 1, 1) (the sparse path adds one sink logit per query head, [4])")
    # Without the call's query (the ONNX export) sinks are not implemented.
    assert plain_attention_reason(site, module, None, 0.0, {"s_aux": torch.zeros(4)})[0] == "unsupported_kwarg"
