"""gsa-compile: compiler passes that turn every attention of a PyTorch model into GSA
(hash-aware top-k sparse attention, HATA) for fast long-context decoding.

The public names load on first use, so that `gsa-compile --help` (which imports this package)
answers without importing torch. The first public name used registers the gsa custom ops
(gsa_compile.ops); so does importing any module that runs them."""

import importlib
import importlib.util
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

# Public name -> the submodule that defines it (None: the name is the submodule itself).
_PUBLIC = {
    "calibrate": ".calibration",  # HATA hash training, docs/accuracy.md
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


def __getattr__(name):
    if name not in _PUBLIC:
        # Submodules stay attributes (gsa_compile.kernels), as when this file imported them all.
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        importlib.import_module(".ops", __name__)
        return importlib.import_module(f".{name}", __name__)
    # The gsa custom ops first (whatever uses a public name may run or load graphs with them),
    # then only the module that defines the name: submodules ask for their siblings this way
    # while they are being imported (`from .. import ops`), so importing more here (the capture
    # routes) could reach a module that is half-way through its own import.
    importlib.import_module(".ops", __name__)
    module = importlib.import_module(_PUBLIC[name] or f".{name}", __name__)
    value = module if _PUBLIC[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
