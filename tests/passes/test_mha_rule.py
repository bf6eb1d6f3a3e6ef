"""Rule mha: nn.MultiheadAttention (dynamo keeps it as one multi_head_attention_forward call)."""

from __future__ import annotations

import pytest
import torch

from gsa_compile import export

from helpers import EXACT, config, run_compiled


class SelfAttention(torch.nn.Module):
    def __init__(self, need_weights: bool, **mha_options):
        super().__init__()
        self.need_weights = need_weights
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, **mha_options)

    def forward(self, query, memory, key_padding_mask=None, attn_mask=None):
        out, weights = self.mha(query, memory, memory, need_weights=self.need_weights,
                                key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return (out, weights) if self.need_weights else out


def _inputs():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 1, 32, generator=generator)
    memory = torch.randn(2, 40, 32, generator=generator)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[1, -7:] = True
    return query, memory, padding


@pytest.mark.parametrize("mha_options", [{}, {"kdim": 24, "vdim": 24}, {"bias": False}], ids=["packed", "separate", "no_bias"])
def test_multihead_attention_rewritten(mha_options):
    torch.manual_seed(0)
    module = SelfAttention(False, **mha_options).eval()
    query, memory, padding = _inputs()
    if "kdim" in mha_options:
        memory = memory[..., :24]
    attn_mask = (torch.arange(40) == 2).expand(1, 40)  # MultiheadAttention's bool masks: True = masked out
    for ratio, exact in ((0.999, True), (0.25, False)):
        out, report = run_compiled(module, config(head_dim=8, ratio=ratio), query, memory, padding, attn_mask)
        assert [site.pattern for site in report.sites] == ["multihead_attention"], report.table()
        reference = module(query, memory, padding, attn_mask)
        if exact:
            torch.testing.assert_close(out, reference, **EXACT)
        else:
            assert (out - reference).abs().max() > 1e-3


def test_attention_weights_requested_is_reported():
    module = SelfAttention(True).eval()
    query, memory, _ = _inputs()
    (out, weights), report = run_compiled(module, config(head_dim=8), query, memory)
    assert not report.sites and "need_weights" in report.unmatched[0].reason


def test_export_decomposes_to_sdpa():
    module = SelfAttention(False).eval()
    query, memory, _ = _inputs()
    program = export(module, (query, memory), config=config(head_dim=8))
    assert [site.pattern for site in program.gsa_report.sites] == ["sdpa"]
    torch.testing.assert_close(program.module()(query, memory), module(query, memory), **EXACT)
