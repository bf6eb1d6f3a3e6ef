"""Rule softmax_attention on spellings of attention found in other codebases (older
transformers models, PyTorch's fuse_attention patterns): each is rewritten exactly, or left
dense with a reason; no spelling makes the compile fail."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from gsa_compile import export
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.passes import matchers

from helpers import EXACT, config, decode_inputs, run_compiled

MIN = torch.finfo(torch.float32).min


def _keep(keys=64, masked=(5,)):
    keep = torch.ones(1, 1, 1, keys, dtype=torch.bool)
    keep[..., list(masked)] = False
    return keep


class InPlaceBias(torch.nn.Module):
    """T5: no scale, the position bias added in place, softmax in float32 cast back by type_as."""

    def forward(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += bias
        weights = torch.nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.matmul(weights, v)


class Clones(torch.nn.Module):
    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1) * 0.25).clone()
        return scores.masked_fill(~keep, float("-inf")).softmax(-1).clone() @ v


class SafeSoftmax(torch.nn.Module):
    """torch._safe_softmax (what SDPA's math path uses): dynamo does not trace it, export does."""

    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1) / 4.0).masked_fill(~keep, float("-inf"))
        return torch._safe_softmax(scores, -1) @ v


class FullFill(torch.nn.Module):
    """GPT-2 before the attention interface: where(causal, scores, full((), finfo.min))."""

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        fill = torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype)
        return torch.where(keep, scores, fill).softmax(-1) @ v


class TensorFill(torch.nn.Module):
    """DistilBERT before the attention interface: the mask expanded to the scores' shape, a tensor fill."""

    def forward(self, q, k, v, keep):
        q = q / math.sqrt(q.shape[-1])
        scores = torch.matmul(q, k.transpose(2, 3))
        mask = (keep == 0).expand_as(scores)
        scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
        return torch.matmul(torch.nn.functional.softmax(scores, dim=-1), v)


class FillThenAdd(torch.nn.Module):
    """GPT-Neo: a causal fill with finfo.min, then the additive padding mask."""

    def forward(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(-1, -2))
        causal = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool).tril(diagonal=k.shape[2])
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min))
        return torch.matmul(torch.softmax(scores + bias, dim=-1), v)


class InPlaceFill(torch.nn.Module):
    """XLM: the scores filled in place, then read again for the softmax."""

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(2, 3))
        mask = (keep == 0).expand_as(scores)
        scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        weights = torch.nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.matmul(weights, v)


class Checkpointed(torch.nn.Module):
    def attend(self, q, k, v, keep):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    def forward(self, q, k, v, keep):
        return checkpoint(self.attend, q, k, v, keep, use_reentrant=False)


class CheckpointedSoftmax(torch.nn.Module):
    def attend(self, q, k, v, keep):
        return (q @ k.transpose(-2, -1) * 0.25).masked_fill(~keep, float("-inf")).softmax(-1) @ v

    def forward(self, q, k, v, keep):
        return checkpoint(self.attend, q, k, v, keep, use_reentrant=False)


class Baddbmm(torch.nn.Module):
    """Bloom's scores without its views: baddbmm(alibi, q, k^T, alpha=1/sqrt(d)) on folded heads."""

    def __init__(self, beta=1.0):
        super().__init__()
        self.beta = beta

    def forward(self, q, k, v, bias):
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        scores = bias.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=self.beta, alpha=1 / math.sqrt(q.shape[-1]))
        return torch.bmm(torch.softmax(scores, dim=-1, dtype=torch.float32), v)


class ReshapedScores(torch.nn.Module):
    """Bloom / MBart: scores of folded heads viewed as [B, H, T, L] for the mask and back."""

    def forward(self, q, k, v, bias):
        b, h, t, d = q.shape
        scores = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, -1, d).transpose(1, 2))
        probs = (scores.view(b, h, t, -1) + bias).softmax(-1)
        return torch.bmm(probs.view(b * h, t, -1), v.reshape(b * h, -1, d))


class ClampedScores(ReshapedScores):
    """XGLM: the masked scores clamped at finfo.min under the [B, H, T, L] view."""

    def forward(self, q, k, v, bias):
        b, h, t, d = q.shape
        scores = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, -1, d).transpose(1, 2))
        scores = scores.view(b, h, t, -1) + bias
        scores = torch.max(scores, torch.full((), torch.finfo(scores.dtype).min)).view(b * h, t, -1)
        return torch.bmm(scores.softmax(-1), v.reshape(b * h, -1, d))


class BloomLike(torch.nn.Module):
    """Bloom: ALiBi through baddbmm on folded heads, the mask added under a [B, H, T, L] view."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alibi", torch.linspace(-1, 0, 64).expand(2, 1, 64).contiguous())

    def forward(self, q, k, v, bias):
        b, h, t, d = q.shape
        scores = self.alibi.baddbmm(batch1=q.reshape(b * h, t, d), batch2=k.reshape(b * h, -1, d).transpose(-1, -2),
                                    beta=1.0, alpha=1 / math.sqrt(d))
        weights = scores.view(b, h, t, -1) + bias
        probs = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs.view(b * h, t, -1), v.reshape(b * h, -1, d))


class FoldedScoresUnfoldedValues(torch.nn.Module):
    """GPT-NeoX-Japanese: baddbmm over a zeros bias on folded heads, scores viewed as [B, H, T, L]
    for the mask and the softmax, values weighted as [B, H, L, D]."""

    def forward(self, q, k, v, bias):
        b, h, t, d = q.shape
        zeros = torch.zeros(b * h, t, k.shape[2], dtype=q.dtype)
        scores = torch.baddbmm(zeros, q.view(b * h, t, d), k.view(b * h, -1, d).transpose(1, 2), beta=1.0,
                               alpha=1 / math.sqrt(d))
        probs = torch.nn.functional.softmax(scores.view(b, h, t, -1) + bias, dim=-1).to(v.dtype)
        return torch.matmul(probs, v)


class RowMaxShift(torch.nn.Module):
    """MiMo-V2-Flash: the row max subtracted before the softmax (fp16 range), as .values or amax."""

    def __init__(self, amax=False):
        super().__init__()
        self.amax = amax

    def forward(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.25 + bias
        top = scores.amax(-1, keepdim=True).detach() if self.amax else scores.max(dim=-1, keepdim=True).values
        return torch.matmul(torch.softmax(scores - top, dim=-1), v)


class ZeroedProbabilities(torch.nn.Module):
    """CPM-Ant: the mask condition spelled twice, -inf before the softmax and 0 after it."""

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = torch.masked_fill(scores, keep.view(1, 1, 1, -1) == torch.tensor(False),
                                   torch.scalar_tensor(float("-inf"), dtype=scores.dtype))
        probs = torch.nn.Softmax(dim=-1)(scores)
        probs = torch.masked_fill(probs, keep.view(1, 1, 1, -1) == torch.tensor(False),
                                  torch.scalar_tensor(0, dtype=probs.dtype))
        return torch.matmul(probs, v)


class ConstantShift(torch.nn.Module):
    """XLNet without segments: a number added to the scores (softmax does not see it)."""

    def forward(self, q, k, v, bias):
        return torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25 + bias + 0, dim=-1) @ v


@pytest.mark.parametrize("module, pattern", [
    (InPlaceBias(), "matmul_softmax"), (Clones(), "matmul_softmax"),
    (FullFill(), "matmul_softmax"), (TensorFill(), "matmul_softmax"), (InPlaceFill(), "matmul_softmax"),
    (FillThenAdd(), "matmul_softmax"), (Checkpointed(), "sdpa"),
    (CheckpointedSoftmax(), "matmul_softmax"), (Baddbmm(), "baddbmm_softmax"), (ReshapedScores(), "bmm_softmax"),
    (ClampedScores(), "bmm_softmax"),
    (BloomLike(), "baddbmm_softmax"), (FoldedScoresUnfoldedValues(), "baddbmm_softmax"),
    (RowMaxShift(), "matmul_softmax"), (RowMaxShift(amax=True), "matmul_softmax"),
    (ZeroedProbabilities(), "matmul_softmax"), (ConstantShift(), "matmul_softmax"),
], ids=lambda x: type(x).__name__ if isinstance(x, torch.nn.Module) else None)
def test_spelling_is_rewritten_exactly(module, pattern):
    q, k, v = decode_inputs()
    if isinstance(module, InPlaceBias):
        extra = torch.randn(1, 2, 1, 64)
    elif isinstance(module, Baddbmm):
        extra = torch.randn(2, 1, 64)
    elif isinstance(module, (ReshapedScores, BloomLike, FillThenAdd, FoldedScoresUnfoldedValues, RowMaxShift,
                             ConstantShift)):
        extra = torch.zeros(1, 1, 1, 64).masked_fill(~_keep(), MIN)
    else:
        extra = _keep()
    graphs = []

    def keep_graph(gm, example_inputs):
        compiled = gsa_backend(gm, example_inputs, options={"config": config(), "compiler": "eager",
                                                            "reports": graphs})
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=keep_graph)(q, k, v, extra)
    report, gm = graphs
    assert [site.pattern for site in report.sites] == [pattern] and not report.unmatched, report.table()
    torch.testing.assert_close(out, module(q, k, v, extra), **EXACT)
    # Nothing outside the replaced chain keeps the dense scores alive.
    assert not [n for n in gm.graph.nodes if n.target in (torch.matmul, torch.bmm, torch.baddbmm, "baddbmm")]


def test_safe_softmax_at_export_level():
    q, k, v = decode_inputs()
    keep = _keep()
    program = export(SafeSoftmax(), (q, k, v, keep), config=config())
    assert [site.pattern for site in program.gsa_report.sites] == ["matmul_softmax"], program.gsa_report.table()
    torch.testing.assert_close(program.module()(q, k, v, keep), SafeSoftmax()(q, k, v, keep), **EXACT)


class UnknownOp(torch.nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).sub(0.5).softmax(-1) @ v


class RelativeBias(torch.nn.Module):
    """q @ r^T + q @ k^T: r (relative position embeddings) must never be taken as the keys."""

    def forward(self, q, k, v, r):
        return (q @ r.transpose(-2, -1) + q @ k.transpose(-2, -1)).softmax(-1) @ v


class ScaledBias(Baddbmm):
    def __init__(self):
        super().__init__(beta=0.5)


class ConcatenatedSink(torch.nn.Module):
    """gpt-oss / Flint: one learned logit per head joins the softmax and is dropped after it."""

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(2))

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.25
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        return probs @ v


class LogSumExpSink(ConcatenatedSink):
    """GraniteMoe-SWA: the sink applied as sigmoid(logsumexp(scores) - sink) on the output."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.25
        scale = (torch.logsumexp(scores, dim=-1) - self.sinks.view(1, -1, 1)).sigmoid()
        return (torch.softmax(scores, dim=-1) @ v) * scale.unsqueeze(-1)


class ZeroedElsewhere(torch.nn.Module):
    def forward(self, q, k, v, keep):
        probs = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")).softmax(-1)
        return probs.masked_fill(~keep.roll(1, -1), 0) @ v


@pytest.mark.parametrize("module, extra, reason", [
    (UnknownOp(), None, "sub (sub) between the scores product and the softmax is not a scale"),
    (ConcatenatedSink(), None, "attention sinks (an extra logit per head in the softmax denominator, concatenated"),
    (LogSumExpSink(), None, "attention sinks (an extra logit per head in the softmax denominator, applied by"),
    (RelativeBias(), torch.randn(1, 2, 64, 16), "both operands of the add are products"),
    (ScaledBias(), torch.randn(2, 1, 64), "baddbmm with beta=0.5"),
    (ZeroedElsewhere(), _keep(), "the probabilities are zeroed where the scores were not masked"),
], ids=lambda x: type(x).__name__ if isinstance(x, torch.nn.Module) else None)
def test_unprovable_spelling_is_reported_not_crashed(module, extra, reason):
    q, k, v = decode_inputs()
    args = (q, k, v) if extra is None else (q, k, v, extra)
    out, report = run_compiled(module, config(), *args)
    assert not report.sites
    assert len(report.unmatched) == 1 and reason in report.unmatched[0].reason, report.table()
    torch.testing.assert_close(out, module(*args), **EXACT)


def test_a_rule_that_raises_leaves_the_site_dense(monkeypatch):
    def broken(node):
        if node.op == "call_function" and node.target is torch.softmax:
            raise TypeError("cannot unpack non-iterable NoneType object")
        return None

    monkeypatch.setattr(matchers.softmax_attention, "match", broken)
    q, k, v = decode_inputs()

    class Plain(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    out, report = run_compiled(Plain(), config(), q, k, v)
    assert not report.sites and "could not read this graph shape (TypeError" in report.unmatched[0].reason
    torch.testing.assert_close(out, Plain()(q, k, v), **EXACT)


class FiniteFill(torch.nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        return (q @ k.transpose(-2, -1) * 0.25).masked_fill(~keep, self.fill).softmax(-1) @ v


@pytest.mark.parametrize("fill", [-1e9, MIN], ids=["-1e9", "finfo.min"])
def test_fully_masked_row_with_a_finite_fill_gives_the_mean_of_values(fill):
    q, k, v = decode_inputs(batch=2)
    keep = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    keep[0] = False  # batch row 0: every key masked
    keep[1, ..., :7] = False
    module = FiniteFill(fill)
    expected = module(q, k, v, keep)
    torch.testing.assert_close(expected[0], v[0].mean(-2, keepdim=True).expand(2, 1, 16))
    out, report = run_compiled(module, config(), q, k, v, keep)
    assert report.sites and report.sites[0].policy == "sparse"
    torch.testing.assert_close(out, expected, **EXACT)


def test_fully_masked_row_with_minus_inf_gives_zero_like_sdpa():
    """Eager softmax gives NaN there; GSA gives SDPA's (and _safe_softmax's) zero."""
    q, k, v = decode_inputs()
    out, _ = run_compiled(FiniteFill(float("-inf")), config(), q, k, v, torch.zeros(1, 1, 1, 64, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
