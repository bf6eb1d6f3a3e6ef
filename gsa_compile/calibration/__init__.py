"""Calibration: HATA hash training per layer and KV head, and the layer-policy profiler."""

from .calibration import CONFIG_FILE, WEIGHTS_FILE, CalibrationResult, calibrate, write_calibration
from .capture import LayerCapture, capture_layers
from .hata import HataSettings
from .profile import ProfileResult, apply_profile, profile_layers

__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "CalibrationResult", "calibrate", "write_calibration",
    "LayerCapture", "capture_layers", "HataSettings", "ProfileResult", "apply_profile", "profile_layers",
]
