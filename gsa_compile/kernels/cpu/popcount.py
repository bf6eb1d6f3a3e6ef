"""Compiled scoring for the CPU kernels: a group's similarity to every key from the weighted
hamming distances of the packed key codes to the group's sign planes, one C loop with the
hardware popcount, reading the codes in place.

numpy's bitwise_count does the same in a few large calls but makes temporaries of every XOR and
count over all L keys (most of the CPU selection's time at 32K keys). The loop is built on
first use with the machine's C compiler (gsa_compile.native_build); without one the kernels
keep the numpy path, with the same integers."""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from typing import Optional

import torch

from ...native_build import NativeUnavailable, build_library

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* out[b, h, l] = top - 2 * sum_p weights[p] * popcount(key[b, h, l] ^ planes[b, h, p]) for
   codes of code_bytes bytes; keys are addressed by byte strides (a cache's slice needs no
   copy), planes are contiguous [B, H, P, code_bytes], out contiguous float64 [B, H, L]. */
void gsa_group_similarity(const uint8_t *keys, int64_t stride_b, int64_t stride_h, int64_t stride_l,
                          const uint8_t *planes, const int32_t *weights, int64_t batch, int64_t heads,
                          int64_t num_keys, int64_t code_bytes, int64_t num_planes, int32_t top, double *out) {
    const int64_t words = code_bytes / 8;
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < heads; h++) {
            const uint8_t *row_planes = planes + (b * heads + h) * num_planes * code_bytes;
            const uint8_t *key = keys + b * stride_b + h * stride_h;
            double *dst = out + (b * heads + h) * num_keys;
            for (int64_t l = 0; l < num_keys; l++, key += stride_l) {
                int32_t total = 0;
                for (int64_t p = 0; p < num_planes; p++) {
                    const uint8_t *plane = row_planes + p * code_bytes;
                    int32_t bits = 0;
                    for (int64_t w = 0; w < words; w++) {
                        uint64_t a, c;
                        memcpy(&a, key + 8 * w, 8);
                        memcpy(&c, plane + 8 * w, 8);
                        bits += __builtin_popcountll(a ^ c);
                    }
                    for (int64_t t = 8 * words; t < code_bytes; t++) bits += __builtin_popcount(key[t] ^ plane[t]);
                    total += weights[p] * bits;
                }
                dst[l] = (double)(top - 2 * total);
            }
        }
    }
}
"""


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    flags = ["-O3"] + (["-mpopcnt"] if platform.machine().lower() in ("x86_64", "amd64") else [])
    try:
        library = ctypes.CDLL(build_library("gsa_cpu_popcount", _SOURCE, flags))
    except (NativeUnavailable, OSError) as exc:
        logger.info("CPU kernels score codes with numpy (slower at long caches): %s", exc)
        return None
    function = library.gsa_group_similarity
    function.restype = None
    function.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p,
                         *[ctypes.c_int64] * 5, ctypes.c_int32, ctypes.c_void_p]
    return library


def available() -> bool:
    return _library() is not None


def group_similarity(key_codes: torch.Tensor, planes: torch.Tensor, weights: list[int]) -> Optional[torch.Tensor]:
    """float64 [B, H, L]: R * sum(weights) - 2 * sum_p weights[p] * hamming(key_codes[b, h, l],
    planes[b, h, p]) for uint8 key_codes [B, H, L, R / 8] (any strides over B, H, L) and planes
    [B, H, P, R / 8]; None when no compiled library is available."""
    library = _library()
    if library is None:
        return None
    if key_codes.stride(-1) != 1:
        key_codes = key_codes.contiguous()
    batch, heads, num_keys, code_bytes = key_codes.shape
    planes = planes.contiguous()
    weight_values = torch.tensor(weights, dtype=torch.int32)
    out = torch.empty((batch, heads, num_keys), dtype=torch.float64)
    stride_b, stride_h, stride_l = key_codes.stride()[:3]
    library.gsa_group_similarity(
        key_codes.data_ptr(), stride_b, stride_h, stride_l, planes.data_ptr(), weight_values.data_ptr(),
        batch, heads, num_keys, code_bytes, planes.shape[2], sum(weights) * code_bytes * 8, out.data_ptr(),
    )
    return out
