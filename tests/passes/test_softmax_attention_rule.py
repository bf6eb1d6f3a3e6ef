"""Rule softmax_attention on generated hand-written variants (tests/passes/variants.py)."""

from __future__ import annotations

import random

import pytest
import torch

from gsa_compile import export

from helpers import EXACT, config, decode_inputs, run_compiled
from variants import HandWrittenAttention, Variant, all_variants

VARIANTS = list(all_variants())
# A fixed sample of the product (every option value appears, checked below), for the CI budget.
SAMPLED = random.Random(0).sample(VARIANTS, 40)


def _inputs(masked_key: int = 5):
    q, k, v = decode_inputs()
    keep = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool)
    keep[..., masked_key] = False
    return q, k, v, keep


def test_sample_covers_every_option():
    for field in ("scale", "mask", "softcap", "upcast", "dropout", "layout", "product"):
        assert {getattr(v, field) for v in SAMPLED} == {getattr(v, field) for v in VARIANTS}, field


@pytest.mark.parametrize("variant", SAMPLED, ids=lambda v: v.name)
def test_variant_is_rewritten_exactly(variant):
    module = HandWrittenAttention(variant).eval()
    inputs = _inputs()
    out, report = run_compiled(module, config(), *inputs)
    assert [site.pattern for site in report.sites] == [f"{variant.product}_softmax"], report.table()
    assert report.sites[0].policy == "sparse" and not report.unmatched
    torch.testing.assert_close(out, module(*inputs), **EXACT)


@pytest.mark.parametrize("variant", [Variant(), Variant(product="einsum", layout="bshd", softcap=True),
                                     Variant(product="bmm", mask="masked_fill", upcast=True)], ids=lambda v: v.name)
def test_small_budget_runs_sparse(variant):
    module = HandWrittenAttention(variant).eval()
    inputs = _inputs()
    out, _ = run_compiled(module, config(ratio=0.25), *inputs)
    assert (out - module(*inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", [Variant(), Variant(product="einsum", layout="bshd", mask="where"),
                                     Variant(product="bmm", scale="div", upcast=True)], ids=lambda v: v.name)
def test_export_level_variant(variant):
    module = HandWrittenAttention(variant).eval()
    inputs = _inputs()
    program = export(module, inputs, config=config())
    assert [site.pattern for site in program.gsa_report.sites] == [f"{variant.product}_softmax"]
    torch.testing.assert_close(program.module()(*inputs), module(*inputs), **EXACT)


class ReturnsProbabilities(torch.nn.Module):
    def forward(self, q, k, v):
        probs = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return probs @ v, probs


class MaskBeforeScale(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return ((q @ k.transpose(-2, -1) + bias) * 0.25).softmax(-1) @ v


class SoftmaxOverQueries(torch.nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-2) @ v


class TrainingDropout(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.dropout((q @ k.transpose(-2, -1)).softmax(-1), p=0.5, training=True) @ v


class FiniteSmallFill(torch.nn.Module):
    def forward(self, q, k, v, keep):
        return (q @ k.transpose(-2, -1)).masked_fill(~keep, -1.0).softmax(-1) @ v


@pytest.mark.parametrize("module, extra, reason", [
    (ReturnsProbabilities(), (), "probabilities are read elsewhere"),
    (MaskBeforeScale(), (torch.zeros(1, 1, 1, 64),), "scaled after the softcap or the mask"),
    (SoftmaxOverQueries(), (), "not over the keys"),
    (TrainingDropout(), (), "not an identity"),
    (FiniteSmallFill(), (torch.ones(1, 1, 1, 64, dtype=torch.bool),), "is not a constant at or below"),
], ids=lambda x: type(x).__name__ if isinstance(x, torch.nn.Module) else None)
def test_not_provable_is_left_untouched_and_reported(module, extra, reason):
    q, k, v = decode_inputs()
    torch.manual_seed(0)
    out, report = run_compiled(module, config(), q, k, v, *extra)
    assert not report.sites
    assert len(report.unmatched) == 1 and reason in report.unmatched[0].reason, report.table()
    if not isinstance(module, TrainingDropout):
        torch.testing.assert_close(out, module(q, k, v, *extra), **EXACT)
