"""`gsa-compile npu-check`, the first thing to run on an Ascend host, here on the emulation."""

import json
import sys

import pytest

from gsa_compile import cli

from .conftest import forget_npu_backend

# CPU tensors routed to the npu kernels, 16 blocks of 32 tokens, 8 selected: small but not trivial.
SMALL_CHECK = ["npu-check", "--device", "cpu", "--batch", "1", "--keys", "512", "--chunk", "32"]


def test_npu_check_passes_on_the_emulation_and_writes_json(emulated_npu, tmp_path, capsys):
    path = tmp_path / "check.json"
    assert cli.main([*SMALL_CHECK, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "torch_npu emulation" in printed and "NO" not in printed
    results = json.loads(path.read_text())
    assert [r["op"] for r in results] == ["encode", "select_blocks", "sparse_attention"] * 2
    assert all(r["ok"] for r in results)
    ops = {name for name, _, _ in emulated_npu.calls}
    assert ops == {"npu_sign_bits_pack", "npu_sign_bits_unpack", "npu_fused_infer_attention_score"}


def _off_by_a_little(fia):
    def call(*args, **kwargs):
        out, lse = fia(*args, **kwargs)
        return out + 0.01, lse
    return call


def _inverted_signs(pack):
    return lambda x, size: pack(-x, size)


@pytest.mark.parametrize("op, broken, verdicts", [
    ("npu_fused_infer_attention_score", _off_by_a_little,
     {("encode", True), ("select_blocks", True), ("sparse_attention", False)}),
    # Inverted key and query codes: the device's own selection differs from the reference's on its codes.
    ("npu_sign_bits_pack", _inverted_signs, {("encode", False), ("select_blocks", False), ("sparse_attention", True)}),
])
def test_npu_check_flags_the_kernel_that_disagrees(emulated_npu, monkeypatch, tmp_path, op, broken, verdicts):
    monkeypatch.setattr(emulated_npu, op, broken(getattr(emulated_npu, op)))
    path = tmp_path / "check.json"
    assert cli.main([*SMALL_CHECK, "--json", str(path)]) == 1
    assert {(r["op"], r["ok"]) for r in json.loads(path.read_text())} == verdicts


def test_npu_check_refuses_keys_that_make_no_paged_case(emulated_npu, capsys):
    assert cli.main(["npu-check", "--device", "cpu", "--keys", "500", "--chunk", "32"]) == 2
    assert "keys=500 must be a multiple of chunk=32" in capsys.readouterr().err


def test_npu_check_without_torch_npu_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    forget_npu_backend(monkeypatch)
    assert cli.main(["npu-check"]) == 2
    assert "torch_npu is not installed" in capsys.readouterr().err
