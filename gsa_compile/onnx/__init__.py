"""ONNX export of GSA models: every GSA site becomes a node of the `gsa` domain (opset 1) and
the model carries a reference function of standard ops for each gsa op, so stock onnxruntime
runs the file and a runtime with native gsa kernels can replace the functions (docs/onnx.md)."""

from .decode import DecodeStep, export_decode_step, greedy_decode, onnx_runner, torch_runner
from .export import attach_functions, export_onnx
from .runtime import session
from .schemas import DOMAIN, OP_SPECS, OPSET_VERSION, register_schemas

__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "OP_SPECS",
    "DecodeStep",
    "attach_functions",
    "export_decode_step",
    "export_onnx",
    "greedy_decode",
    "onnx_runner",
    "register_schemas",
    "session",
    "torch_runner",
]
