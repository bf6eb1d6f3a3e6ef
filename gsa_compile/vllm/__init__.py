"""GSA as a vLLM plugin (docs/vllm.md): `register` is the `vllm.general_plugins` entry point.

Importing this package does not import vLLM; the backend module does, when vLLM loads it."""

from .plugin import ENV_VAR, active_config, layer_counts, register

__all__ = ["ENV_VAR", "active_config", "layer_counts", "register"]
