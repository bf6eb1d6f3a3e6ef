"""One dispatcher for every GSA op: picks a backend's kernel by device, the reference where
none fits.

Backends register kernels per op name (`encode`, `select_blocks`, `sparse_attention`). A
kernel may come with `supports(*args, **kwargs) -> Optional[str]`: a returned reason declines
the call, the next kernel (or the reference) serves it, and the reason is logged once.
Backend modules load lazily the first time their device is seen, so a missing package
(triton, torch_npu) costs nothing until it is needed and then says clearly what is missing."""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import GSABackendUnavailable

logger = logging.getLogger(__name__)

OPS = ("encode", "select_blocks", "sparse_attention")

# Which backend serves which torch device type, and the module that registers its kernels.
DEVICE_BACKENDS = {"cpu": "cpu", "cuda": "triton", "npu": "npu"}
BACKEND_MODULES = {
    "reference": "gsa_compile.kernels.reference",  # pure torch, any device: what every kernel matches
    "cpu": "gsa_compile.kernels.cpu",
    "triton": "gsa_compile.kernels.triton",
    "npu": "gsa_compile.kernels.npu",
}


@dataclass(frozen=True)
class Kernel:
    op: str
    backend: str
    fn: Callable
    supports: Optional[Callable] = None


_REGISTRY: dict[tuple[str, str], list[Kernel]] = {}
_LOADED: dict[str, Optional[str]] = {}
_LOGGED: set = set()
_FORCED = threading.local()


def register_kernel(op: str, backend: str, fn: Callable, supports: Optional[Callable] = None) -> None:
    """Make `fn` serve `op` on `backend`; later registrations are tried first."""
    if op not in OPS:
        raise ValueError(f"unknown GSA op {op!r}; ops are {list(OPS)}")
    _REGISTRY.setdefault((op, backend), []).insert(0, Kernel(op, backend, fn, supports))


def load_backend(backend: str) -> Optional[str]:
    """Import a backend's module once; returns None when it loaded, else why it did not."""
    if backend not in _LOADED:
        module = BACKEND_MODULES.get(backend)
        if module is None:
            _LOADED[backend] = f"no backend named {backend!r}; backends are {sorted(BACKEND_MODULES)}"
        else:
            try:
                loaded = importlib.import_module(module)
                # A module can import and still be unusable (a package installed but unable to
                # load); it then says why through an optional availability() -> reason or None.
                availability = getattr(loaded, "availability", None)
                _LOADED[backend] = availability() if availability is not None else None
            except (ImportError, GSABackendUnavailable, RuntimeError) as exc:
                _LOADED[backend] = f"{type(exc).__name__}: {exc}"
    return _LOADED[backend]


@contextlib.contextmanager
def use_backend(backend: str):
    """Route every GSA op to `backend`'s kernels whatever the tensors' device (for example the
    Triton kernels on CPU tensors under TRITON_INTERPRET=1). Raises if it cannot load."""
    reason = load_backend(backend)
    if reason is not None:
        raise GSABackendUnavailable(f"backend {backend!r} cannot be used here: {reason}")
    previous = getattr(_FORCED, "backend", None)
    _FORCED.backend = backend
    try:
        yield
    finally:
        _FORCED.backend = previous


def backend_for(device_type: str) -> Optional[str]:
    return getattr(_FORCED, "backend", None) or DEVICE_BACKENDS.get(device_type)


def choose_kernel(op: str, device_type: str, *args, **kwargs) -> Kernel:
    """The kernel that will serve this call (the reference when no backend kernel accepts it)."""
    backend = backend_for(device_type)
    if backend is not None:
        reason = load_backend(backend)
        if reason is not None:
            _log_once((backend, "load"), "GSA backend %r is unavailable (%s); using the reference kernels", backend, reason)
        else:
            for kernel in _REGISTRY.get((op, backend), ()):
                declined = kernel.supports(*args, **kwargs) if kernel.supports else None
                if declined is None:
                    return kernel
                _log_once((op, backend, declined), "GSA %s kernel of backend %r declined: %s; using the reference", op, backend, declined)
    return _reference_kernel(op)


def dispatch(op: str, device_type: str, *args, **kwargs):
    return choose_kernel(op, device_type, *args, **kwargs).fn(*args, **kwargs)


def registered_kernels() -> list[tuple[str, str]]:
    """(op, backend) pairs that have a kernel, after loading every backend that can load."""
    for backend in BACKEND_MODULES:
        load_backend(backend)
    return sorted(_REGISTRY)


def _reference_kernel(op: str) -> Kernel:
    from . import reference

    return Kernel(op, "reference", getattr(reference, op))


def _log_once(key, message, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(message, *args)
