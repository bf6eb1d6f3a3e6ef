"""Python kernels as onnxruntime custom ops through its C API, reading and writing the
runtime's own tensor buffers (no copy of an input).

onnxruntime loads custom ops from a shared library whose `RegisterCustomOps(options, api_base)`
fills an OrtCustomOpDomain. The library here is a few lines of C (compiled once per machine with
the system C compiler, cached) that forwards that call to a Python callback; everything else
(the OrtCustomOp tables, attribute reads, tensor access) is ctypes over the C API's function
table, whose entries keep their positions across releases (the table only grows). Inputs
reach the kernel as numpy/torch views of onnxruntime's buffers; outputs are allocated by
onnxruntime and filled in place.

The tables use version 13 of the C API (onnxruntime >= 1.13): the callbacks then have no way
to report an error, so an exception inside a kernel is kept and re-raised by the session's
`run` (runtime.GSASession), never lost."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..native_build import NativeUnavailable, build_library

logger = logging.getLogger(__name__)

API_VERSION = 13

# Positions in the OrtApi function table (onnxruntime_c_api.h, version 13).
_API_INDEX = dict(
    CreateStatus=0, GetErrorMessage=2, CreateCustomOpDomain=26, CustomOpDomain_Add=27, AddCustomOpDomain=28,
    GetTensorMutableData=51, GetTensorElementType=60, GetDimensionsCount=61, GetDimensions=62,
    GetTensorTypeAndShape=65, KernelInfoGetAttribute_float=85, KernelInfoGetAttribute_int64=86,
    KernelInfoGetAttribute_string=87, KernelContext_GetInputCount=88, KernelContext_GetInput=90,
    KernelContext_GetOutput=91, ReleaseStatus=93, ReleaseTensorTypeAndShapeInfo=99,
    KernelInfoGetAttributeArray_int64=163,
)
_P, _S = ctypes.c_void_p, ctypes.c_size_t
_SIGNATURES = dict(
    CreateStatus=(_P, ctypes.c_int, ctypes.c_char_p), GetErrorMessage=(ctypes.c_char_p, _P),
    CreateCustomOpDomain=(_P, ctypes.c_char_p, ctypes.POINTER(_P)), CustomOpDomain_Add=(_P, _P, _P),
    AddCustomOpDomain=(_P, _P, _P), GetTensorMutableData=(_P, _P, ctypes.POINTER(_P)),
    GetTensorElementType=(_P, _P, ctypes.POINTER(ctypes.c_int)), GetDimensionsCount=(_P, _P, ctypes.POINTER(_S)),
    GetDimensions=(_P, _P, ctypes.POINTER(ctypes.c_int64), _S), GetTensorTypeAndShape=(_P, _P, ctypes.POINTER(_P)),
    KernelInfoGetAttribute_float=(_P, _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_float)),
    KernelInfoGetAttribute_int64=(_P, _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64)),
    KernelInfoGetAttribute_string=(_P, _P, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_S)),
    KernelContext_GetInputCount=(_P, _P, ctypes.POINTER(_S)),
    KernelContext_GetInput=(_P, _P, _S, ctypes.POINTER(_P)),
    KernelContext_GetOutput=(_P, _P, _S, ctypes.POINTER(ctypes.c_int64), _S, ctypes.POINTER(_P)),
    ReleaseStatus=(None, _P), ReleaseTensorTypeAndShapeInfo=(None, _P),
    KernelInfoGetAttributeArray_int64=(_P, _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(_S)),
)

# ONNXTensorElementDataType <-> numpy.
ELEMENT_TYPES = {
    "tensor(float)": 1, "tensor(uint8)": 2, "tensor(int32)": 6, "tensor(int64)": 7, "tensor(bool)": 9,
    "tensor(float16)": 10, "tensor(double)": 11,
}
_NUMPY = {1: np.float32, 2: np.uint8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}

_SHIM = r"""
typedef void *(*gsa_registrar)(void *options, const void *api_base);
static gsa_registrar registrar;
void gsa_set_registrar(gsa_registrar fn) { registrar = fn; }
void *RegisterCustomOps(void *options, const void *api_base) { return registrar(options, api_base); }
"""


_REGISTERING = threading.Lock()


def shim_path() -> str:
    """The compiled shim, built on first use into the user cache (gsa_compile.native_build)."""
    try:
        return build_library("ort_custom_ops", _SHIM)
    except NativeUnavailable as exc:
        raise NativeUnavailable(f"{exc}: needed for the 4-line custom-op shim that onnxruntime loads") from None


class _CustomOp(ctypes.Structure):
    """OrtCustomOp, version 13 layout."""

    _fields_ = [
        ("version", ctypes.c_uint32),
        ("CreateKernel", ctypes.CFUNCTYPE(_P, _P, _P, _P)),
        ("GetName", ctypes.CFUNCTYPE(_P, _P)),
        ("GetExecutionProviderType", ctypes.CFUNCTYPE(_P, _P)),
        ("GetInputType", ctypes.CFUNCTYPE(ctypes.c_int, _P, _S)),
        ("GetInputTypeCount", ctypes.CFUNCTYPE(_S, _P)),
        ("GetOutputType", ctypes.CFUNCTYPE(ctypes.c_int, _P, _S)),
        ("GetOutputTypeCount", ctypes.CFUNCTYPE(_S, _P)),
        ("KernelCompute", ctypes.CFUNCTYPE(None, _P, _P)),
        ("KernelDestroy", ctypes.CFUNCTYPE(None, _P)),
        ("GetInputCharacteristic", ctypes.CFUNCTYPE(ctypes.c_int, _P, _S)),
        ("GetOutputCharacteristic", ctypes.CFUNCTYPE(ctypes.c_int, _P, _S)),
        ("GetInputMemoryType", ctypes.CFUNCTYPE(ctypes.c_int, _P, _S)),
    ]


@dataclass(frozen=True)
class KernelSpec:
    """One custom op: its name, ONNX element types of inputs and outputs (one spec per type
    combination; specs may share a name), the attributes its kernel reads (name -> 'int',
    'float', 'string' or 'ints') and the kernel, run(inputs: list of torch tensors viewing
    onnxruntime's buffers, attributes: dict) -> list of output tensors or arrays."""

    name: str
    inputs: Sequence[int]
    outputs: Sequence[int]
    attributes: dict
    run: Callable


class _Api:
    """The C API function table, called through ctypes."""

    def __init__(self, api_base: int):
        get_api = ctypes.CFUNCTYPE(_P, ctypes.c_uint32)(ctypes.cast(api_base, ctypes.POINTER(_P))[0])
        table = get_api(API_VERSION)
        if not table:
            raise NativeUnavailable(f"this onnxruntime does not provide version {API_VERSION} of its C API")
        entries = ctypes.cast(table, ctypes.POINTER(_P))
        for name, index in _API_INDEX.items():
            restype, *argtypes = _SIGNATURES[name]
            setattr(self, name, ctypes.CFUNCTYPE(restype, *argtypes)(entries[index]))
        # The table positions are this module's assumption: check one round trip through it.
        status = self.CreateStatus(1, b"gsa-compile probe")
        message = self.GetErrorMessage(status)
        self.ReleaseStatus(status)
        if message != b"gsa-compile probe":
            raise NativeUnavailable("onnxruntime's C API table does not have the expected layout")

    def check(self, status) -> None:
        if status:
            message = self.GetErrorMessage(status).decode(errors="replace")
            self.ReleaseStatus(status)
            raise RuntimeError(f"onnxruntime C API: {message}")

    # ---------------------------------------------------------------- kernel info
    def attribute(self, info, name: str, kind: str):
        key = name.encode()
        if kind == "int":
            out = ctypes.c_int64()
            self.check(self.KernelInfoGetAttribute_int64(info, key, ctypes.byref(out)))
            return int(out.value)
        if kind == "float":
            out = ctypes.c_float()
            self.check(self.KernelInfoGetAttribute_float(info, key, ctypes.byref(out)))
            return float(out.value)
        size = _S(0)
        if kind == "string":
            self.check(self.KernelInfoGetAttribute_string(info, key, None, ctypes.byref(size)))
            buffer = ctypes.create_string_buffer(size.value)
            self.check(self.KernelInfoGetAttribute_string(info, key, buffer, ctypes.byref(size)))
            return buffer.value.decode()
        if kind == "ints":
            self.check(self.KernelInfoGetAttributeArray_int64(info, key, None, ctypes.byref(size)))
            values = (ctypes.c_int64 * max(size.value, 1))()
            self.check(self.KernelInfoGetAttributeArray_int64(info, key, values, ctypes.byref(size)))
            return [int(v) for v in values[: size.value]]
        raise ValueError(f"attribute kind {kind!r} is not readable through version {API_VERSION} of the C API")

    # ---------------------------------------------------------------- tensors
    def _view(self, value, shape=None) -> torch.Tensor:
        info = _P()
        self.check(self.GetTensorTypeAndShape(value, ctypes.byref(info)))
        try:
            element, rank = ctypes.c_int(), _S()
            self.check(self.GetTensorElementType(info, ctypes.byref(element)))
            if shape is None:
                self.check(self.GetDimensionsCount(info, ctypes.byref(rank)))
                dims = (ctypes.c_int64 * max(rank.value, 1))()
                self.check(self.GetDimensions(info, dims, rank.value))
                shape = tuple(dims[: rank.value])
        finally:
            self.ReleaseTensorTypeAndShapeInfo(info)
        dtype = np.dtype(_NUMPY[element.value])
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            array = np.empty(shape, dtype)
        else:
            data = _P()
            self.check(self.GetTensorMutableData(value, ctypes.byref(data)))
            buffer = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(data.value)
            array = np.frombuffer(buffer, dtype).reshape(shape)
        return torch.from_numpy(array)

    def inputs(self, context) -> list:
        count = _S()
        self.check(self.KernelContext_GetInputCount(context, ctypes.byref(count)))
        views = []
        for index in range(count.value):
            value = _P()
            self.check(self.KernelContext_GetInput(context, index, ctypes.byref(value)))
            views.append(self._view(value))
        return views

    def output(self, context, index: int, shape) -> torch.Tensor:
        dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        value = _P()
        self.check(self.KernelContext_GetOutput(context, index, dims, len(shape), ctypes.byref(value)))
        return self._view(value, tuple(shape))


class CustomOpLibrary:
    """A custom-op domain of Python kernels, registered with onnxruntime session options.

    errors: exceptions raised inside kernels, per thread, for the session to re-raise;
    seconds: process time spent in each op's kernel."""

    def __init__(self, domain: str, specs: Sequence[KernelSpec]):
        self.domain = domain
        self.specs = list(specs)
        self.errors = threading.local()
        self.seconds: Counter = Counter()  # process time inside each op's kernel (the bridge excluded)
        self._path = shim_path()
        self._library = ctypes.CDLL(self._path)
        self._keep: list = []  # every ctypes object onnxruntime holds a pointer to
        self._kernels: dict = {}
        self._next_kernel = 1
        self._lock = threading.Lock()
        self._ops: list = []
        self._api: Optional[_Api] = None
        self._registrar = ctypes.CFUNCTYPE(_P, _P, _P)(self._register)
        self._library.gsa_set_registrar.argtypes = [ctypes.CFUNCTYPE(_P, _P, _P)]
        self._registration_error: Optional[BaseException] = None

    def add_to(self, options) -> None:
        """Register the domain with onnxruntime SessionOptions."""
        self._registration_error = None
        with _REGISTERING:  # the shim forwards to one registrar at a time: this library's, now
            self._library.gsa_set_registrar(self._registrar)
            options.register_custom_ops_library(self._path)
        if self._registration_error is not None:
            raise self._registration_error

    # ---------------------------------------------------------------- registration
    def _register(self, options, api_base):
        try:
            if self._api is None:
                self._api = _Api(api_base)
                self._build_ops()
            api = self._api
            domain = _P()
            api.check(api.CreateCustomOpDomain(self.domain.encode(), ctypes.byref(domain)))
            for op in self._ops:
                api.check(api.CustomOpDomain_Add(domain, ctypes.addressof(op)))
            api.check(api.AddCustomOpDomain(options, domain))
            return None
        except BaseException as exc:  # reported by add_to: a ctypes callback cannot raise
            self._registration_error = exc
            return self._api.CreateStatus(1, str(exc).encode()) if self._api else None

    def _build_ops(self) -> None:
        callbacks = dict(
            CreateKernel=self._create_kernel, GetName=lambda op: ctypes.addressof(self._names[op]),
            GetExecutionProviderType=lambda op: None,
            GetInputType=lambda op, i: self._spec(op).inputs[i], GetInputTypeCount=lambda op: len(self._spec(op).inputs),
            GetOutputType=lambda op, i: self._spec(op).outputs[i],
            GetOutputTypeCount=lambda op: len(self._spec(op).outputs),
            KernelCompute=self._compute, KernelDestroy=self._destroy,
            GetInputCharacteristic=lambda op, i: 0, GetOutputCharacteristic=lambda op, i: 0,
            GetInputMemoryType=lambda op, i: 0,
        )
        self._names, self._op_specs = {}, {}
        fields = dict(_CustomOp._fields_)
        for spec in self.specs:
            op = _CustomOp(version=API_VERSION)
            for name, function in callbacks.items():
                pointer = fields[name](function)
                self._keep.append(pointer)
                setattr(op, name, pointer)
            address = ctypes.addressof(op)
            self._names[address] = ctypes.create_string_buffer(spec.name.encode())
            self._op_specs[address] = spec
            self._ops.append(op)

    def _spec(self, op) -> KernelSpec:
        return self._op_specs[op]

    # ---------------------------------------------------------------- kernels
    def _create_kernel(self, op, api, info):
        spec = self._spec(op)
        try:
            attributes = {name: self._api.attribute(info, name, kind) for name, kind in spec.attributes.items()}
        except BaseException as exc:  # a callback cannot raise: the kernel's calls raise it instead
            attributes = exc
        with self._lock:
            handle = self._next_kernel
            self._next_kernel += 1
            self._kernels[handle] = (spec, attributes)
        return handle

    def _destroy(self, handle) -> None:
        with self._lock:
            self._kernels.pop(handle, None)

    def _compute(self, handle, context) -> None:
        spec, attributes = self._kernels[handle]
        started = time.process_time()
        try:
            if isinstance(attributes, BaseException):
                raise attributes
            results = spec.run(self._api.inputs(context), attributes)
            self.seconds[spec.name] += time.process_time() - started
            for index, result in enumerate(results):
                result = torch.as_tensor(result)
                self._api.output(context, index, tuple(result.shape)).copy_(result)
        except BaseException as exc:  # kept for the session's run to raise
            logger.error("gsa.%s kernel failed: %s", spec.name, exc)
            pending = getattr(self.errors, "pending", None)
            if pending is None:
                self.errors.pending = exc
            for index in range(len(spec.outputs)):
                try:
                    self._api.output(context, index, (0,))
                except BaseException:  # noqa: S110 (the first error is the one reported)
                    pass
