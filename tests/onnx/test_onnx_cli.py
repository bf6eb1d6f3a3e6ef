"""`gsa-compile export-onnx` on a tiny random-weight Llama: writes a checked file whose greedy
decode in onnxruntime agrees with PyTorch; a model it cannot export is refused with the reason."""

from __future__ import annotations

import onnx

from gsa_compile.cli import main
from gsa_compile.onnx import DOMAIN


def test_export_onnx_command_writes_a_verified_decode_step(tmp_path, capsys):
    path = tmp_path / "llama_step.onnx"
    assert main(["export-onnx", "llama", "--layers", "2", "--out", str(path), "--verify", "6"]) == 0
    printed = capsys.readouterr().out
    assert "agree on 6/6" in printed
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert any(node.domain == DOMAIN and node.op_type == "Attention" for node in model.graph.node)


def test_export_onnx_command_names_the_models_it_accepts(tmp_path, capsys):
    assert main(["export-onnx", "gpt2", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "local model directory or one of" in capsys.readouterr().err
