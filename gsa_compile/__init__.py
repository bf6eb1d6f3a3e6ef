"""gsa-compile: compiler passes that turn every attention of a PyTorch model into GSA
(hash-aware top-k sparse attention, HATA) for fast long-context decoding."""

import logging

from . import functional, ops  # noqa: F401  (registers the gsa custom ops)
from .config import GSAConfig, load_config, shipped_config_names
from .errors import GSABackendUnavailable, GSAConfigError, GSAError, GSAInputError
from .kernels import use_backend
from .api import export, inspect, optimize  # noqa: E402  (the graph route: passes need the ops above)
from .onnx import export_onnx  # noqa: E402  (gsa-domain ONNX export, docs/onnx.md)
from .calibrate import calibrate  # noqa: E402  (HATA hash training, docs/accuracy.md)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "calibrate",
    "export",
    "export_onnx",
    "inspect",
    "optimize",
    "GSAConfig",
    "GSAConfigError",
    "GSAError",
    "GSAInputError",
    "GSABackendUnavailable",
    "functional",
    "load_config",
    "shipped_config_names",
    "use_backend",
]
