"""`gsa-compile npu-check`, the first thing to run on an Ascend host, here on the emulation."""

import json
import sys

from gsa_compile import cli

from .conftest import forget_npu_backend


def test_npu_check_passes_on_the_emulation_and_writes_json(emulated_npu, tmp_path, capsys):
    path = tmp_path / "check.json"
    assert cli.main(["npu-check", "--device", "cpu", "--batch", "1", "--keys", "512", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "torch_npu emulation" in printed and "NO" not in printed
    results = json.loads(path.read_text())
    assert [r["op"] for r in results] == ["encode", "select_blocks", "sparse_attention"] * 2
    assert all(r["ok"] for r in results)
    ops = {name for name, _, _ in emulated_npu.calls}
    assert ops == {"npu_sign_bits_pack", "npu_sign_bits_unpack", "npu_fused_infer_attention_score"}


def test_npu_check_flags_a_kernel_that_disagrees(emulated_npu, monkeypatch, tmp_path):
    honest = emulated_npu.npu_fused_infer_attention_score

    def off_by_a_little(*args, **kwargs):
        out, lse = honest(*args, **kwargs)
        return out + 0.01, lse

    monkeypatch.setattr(emulated_npu, "npu_fused_infer_attention_score", off_by_a_little)
    path = tmp_path / "check.json"
    assert cli.main(["npu-check", "--device", "cpu", "--batch", "1", "--keys", "512", "--json", str(path)]) == 1
    verdicts = {(r["op"], r["ok"]) for r in json.loads(path.read_text())}
    assert verdicts == {("encode", True), ("select_blocks", True), ("sparse_attention", False)}


def test_npu_check_without_torch_npu_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    forget_npu_backend(monkeypatch)
    assert cli.main(["npu-check"]) == 2
    assert "torch_npu is not installed" in capsys.readouterr().err
