"""Run one gsa node (with its model-local reference function) in onnxruntime.

This folder has no __init__.py on purpose: a package named `onnx` under tests/ would shadow
the onnx library for every test module that imports it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from gsa_compile.onnx.export import IR_VERSION, node_model  # noqa: F401  (IR_VERSION: for the tests' own models)


def site_attrs(*, chunk_size, top_k_ratio=None, budget_tokens=None, must_select=(0, -2, -1), scale,
               softcap=None, is_causal=False, seq_len_threshold=0, concurrency_threshold=0) -> dict:
    """Attributes of an Attention / ReuseAttention node, written the way the exporter writes them."""
    return {
        "chunk_size": chunk_size,
        "top_k_ratio": numpy_helper.from_array(np.array(top_k_ratio or 0.0, dtype=np.float64), "top_k_ratio"),
        "budget_tokens": budget_tokens or 0,
        "must_select": helper.make_attribute("must_select", list(must_select), attr_type=onnx.AttributeProto.INTS),
        "scale": float(scale),
        "softcap": float(softcap or 0.0),
        "is_causal": int(is_causal),
        "seq_len_threshold": seq_len_threshold,
        "concurrency_threshold": concurrency_threshold,
    }


class GSANode:
    """A one-node model of gsa.<op> whose inputs have fully dynamic dims, checked and loaded once."""

    def __init__(self, op: str, example: dict, **attrs):
        self.model = node_model(op, {name: _numpy(value) for name, value in example.items()}, **attrs)
        self.session = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])

    def __call__(self, **inputs) -> list[np.ndarray]:
        return self.session.run(None, {name: _numpy(value) for name, value in inputs.items()})


def _numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def additive(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as the additive float mask the gsa ops take (-inf = masked)."""
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
