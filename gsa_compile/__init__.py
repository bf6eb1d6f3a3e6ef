"""gsa-compile: compiler passes that turn every attention of a PyTorch model into GSA
(hash-aware top-k sparse attention, HATA) for fast long-context decoding.

The public names load on first use, so that `gsa-compile --help` (which imports this package)
answers without importing torch; the first of them imports everything, the gsa custom ops
included."""

import importlib
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

# Public name -> the submodule that defines it (None: the name is the submodule itself).
_PUBLIC = {
    "calibrate": ".calibrate",  # HATA hash training, docs/accuracy.md
    "export": ".api",
    "export_onnx": ".onnx",  # gsa-domain ONNX export, docs/onnx.md
    "inspect": ".api",
    "optimize": ".api",
    "GSAConfig": ".config",
    "GSAConfigError": ".errors",
    "GSAError": ".errors",
    "GSAInputError": ".errors",
    "GSABackendUnavailable": ".errors",
    "functional": None,
    "ops": None,
    "load_config": ".config",
    "shipped_config_names": ".config",
    "use_backend": ".kernels",
}

__all__ = [name for name in _PUBLIC if name != "ops"]


def _load_public() -> None:
    # The ops register the gsa custom ops, which the graph route's passes need.
    for module in (".functional", ".ops", ".config", ".errors", ".kernels", ".api", ".onnx", ".calibrate"):
        importlib.import_module(module, __name__)
    for name, module in _PUBLIC.items():
        if module is not None:
            globals()[name] = getattr(importlib.import_module(module, __name__), name)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load_public()
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
