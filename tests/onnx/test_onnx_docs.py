"""docs/onnx.md documents every op, input, output and attribute of the gsa domain."""

from __future__ import annotations

import pathlib

import onnx

from gsa_compile.onnx import DOMAIN, OP_SPECS, OPSET_VERSION, register_schemas

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "onnx.md"


def test_the_doc_names_every_op_input_output_and_attribute():
    text = DOC.read_text()
    for name, spec in OP_SPECS.items():
        assert f"## gsa.{name}" in text
        for item in (*spec.inputs, *spec.outputs, *spec.attributes):
            assert f"`{item.name}`" in text, f"gsa.{name}: {item.name} is not documented"


def test_the_schemas_are_registered_with_onnx():
    register_schemas()
    for name, spec in OP_SPECS.items():
        schema = onnx.defs.get_schema(name, OPSET_VERSION, DOMAIN)
        assert [p.name for p in schema.inputs] == [p.name for p in spec.inputs]
        assert sorted(schema.attributes) == sorted(a.name for a in spec.attributes)
