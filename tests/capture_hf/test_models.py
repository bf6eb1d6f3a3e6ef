"""Every covered transformers architecture: sites found, exact at full budget, live when sparse."""

from __future__ import annotations

import copy

import pytest
import torch

from gsa_compile.capture.hf import optimize_transformers

from .helpers import decode_logits, gsa_config
from .tiny_models import BUILDERS, VOCAB, build

PROMPT = 40
LONG_PROMPT = 96
DECODE_STEPS = 16


def _sliding_layers(model) -> set:
    types = getattr(model.config, "layer_types", None) or []
    return {layer for layer, kind in enumerate(types) if kind == "sliding_attention" and model.config.sliding_window}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_full_budget_matches_original_and_small_budget_is_live(name):
    original = build(name)
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original))

    selecting = {1, 2, 3} - _sliding_layers(original)
    counts = model.gsa_report.counts()
    assert counts["sparse"] + counts["reuse"] == len(selecting)
    assert {site.layer for site in model.gsa_report.sites if site.policy != "dense"} == selecting

    torch.manual_seed(1)
    prompt = torch.randint(3, VOCAB, (1, PROMPT))
    expected, _ = decode_logits(original, prompt, DECODE_STEPS)
    model.gsa_runtime.reset_stats()
    got, _ = decode_logits(model, prompt, DECODE_STEPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    sparse_calls = sum(site.stats.sparse_calls for site in model.gsa_runtime.sites.values())
    assert sparse_calls == DECODE_STEPS * len(selecting)

    greedy = dict(max_new_tokens=DECODE_STEPS, do_sample=False)
    assert torch.equal(model.generate(prompt, **greedy), original.generate(prompt, **greedy))

    small = optimize_transformers(model, gsa_config(original, budget_tokens=16))
    long_prompt = torch.randint(3, VOCAB, (1, LONG_PROMPT))
    dense, _ = decode_logits(original, long_prompt, 4)
    sparse, _ = decode_logits(small, long_prompt, 4)
    assert (sparse - dense).abs().max() > 1e-4
