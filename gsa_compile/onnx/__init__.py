"""ONNX export of GSA models: gsa-domain custom ops with model-local reference functions."""
