"""Compiled loops of the CPU kernels, reading the cache's tensors in place:

- group_similarity: a group's similarity to every key from the weighted hamming distances of
  the packed key codes to the group's sign planes (hardware popcount). numpy's bitwise_count
  does the same in a few large calls but makes temporaries of every XOR and count over all L
  keys (most of the CPU selection's time at 32K keys);
- sparse_attention_f32: float32 attention of a GQA group over its selected blocks with an
  online softmax, K and V read from the cache (the torch path gathers the selected tokens into
  new tensors first, then runs SDPA over them: three passes over the selected bytes, not one).

They are built on first use with the machine's C compiler (gsa_compile.native_build); without
one the kernels keep their torch/numpy paths (the same integers; attention equal to rounding)."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Optional

import torch

from ...native_build import NativeUnavailable, build_library

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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
            if (code_bytes == 16 && num_planes <= 8) {
                /* 128-bit codes (the default): the key's two words loaded once for all planes. */
                uint64_t plane_words[16];
                memcpy(plane_words, row_planes, 16 * num_planes);
                for (int64_t l = 0; l < num_keys; l++, key += stride_l) {
                    uint64_t k0, k1;
                    memcpy(&k0, key, 8);
                    memcpy(&k1, key + 8, 8);
                    int32_t total = 0;
                    for (int64_t p = 0; p < num_planes; p++)
                        total += weights[p] * (__builtin_popcountll(k0 ^ plane_words[2 * p])
                                               + __builtin_popcountll(k1 ^ plane_words[2 * p + 1]));
                    dst[l] = (double)(top - 2 * total);
                }
                continue;
            }
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

/* out[b, h * groups + g, :] = softmax over the selected tokens t of (scale * q . k_t + bias)
   weighting v_t, for the groups query heads g of KV head h; blocks [B, Hkv, slots] (-1 entries
   skipped), tokens past num_keys or with valid == 0 skipped, a sink logit per query head joins
   the denominator with a zero value; a head with no token (and no sink) gets zeros, one with a
   NaN logit NaN (as SDPA). One block at a time: its logits, one rescale of the running sums,
   then each value row read once for the whole group. Strides in elements; the last dim of q,
   k, v is contiguous; out is contiguous [B, Hq, dim_v]. Returns 0, or 1 when its scratch
   memory could not be allocated. */
int gsa_sparse_attention_f32(
    const float *q, int64_t sq_b, int64_t sq_h,
    const float *k, int64_t sk_b, int64_t sk_h, int64_t sk_l,
    const float *v, int64_t sv_b, int64_t sv_h, int64_t sv_l,
    const int32_t *blocks, int64_t sb_b, int64_t sb_h, int64_t sb_k, int64_t num_slots,
    const uint8_t *valid, int64_t sva_b, int64_t sva_l,
    const float *bias, int64_t sbi_b, int64_t sbi_h, int64_t sbi_l,
    const float *sinks,
    int64_t batch, int64_t kv_heads, int64_t groups, int64_t num_keys, int64_t dim, int64_t dim_v,
    int64_t chunk, float scale, float *out) {
    float *acc = malloc(sizeof(float) * groups * dim_v);
    float *top = malloc(sizeof(float) * groups);
    float *total = malloc(sizeof(float) * groups);
    float *logits = malloc(sizeof(float) * groups * chunk);
    uint8_t *nan_seen = malloc(groups);
    if (!acc || !top || !total || !logits || !nan_seen) {
        free(acc); free(top); free(total); free(logits); free(nan_seen);
        return 1;
    }
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            for (int64_t g = 0; g < groups; g++) { top[g] = -INFINITY; total[g] = 0.0f; nan_seen[g] = 0; }
            memset(acc, 0, sizeof(float) * groups * dim_v);
            const int32_t *row = blocks + b * sb_b + h * sb_h;
            for (int64_t slot = 0; slot < num_slots; slot++) {
                int64_t block = row[slot * sb_k];
                if (block < 0) continue;
                int64_t start = block * chunk;
                int64_t count = (start + chunk < num_keys ? start + chunk : num_keys) - start;
                for (int64_t i = 0; i < count; i++) {
                    int64_t t = start + i;
                    int allowed = !valid || valid[b * sva_b + t * sva_l];
                    const float *key = k + b * sk_b + h * sk_h + t * sk_l;
                    for (int64_t g = 0; g < groups; g++) {
                        float logit = -INFINITY;
                        if (allowed) {
                            const float *query = q + b * sq_b + (h * groups + g) * sq_h;
                            float dot = 0.0f;
                            #pragma omp simd reduction(+:dot)
                            for (int64_t d = 0; d < dim; d++) dot += query[d] * key[d];
                            logit = dot * scale;
                            if (bias) logit += bias[b * sbi_b + (h * groups + g) * sbi_h + t * sbi_l];
                            nan_seen[g] |= logit != logit;
                        }
                        logits[g * chunk + i] = logit;
                    }
                }
                for (int64_t g = 0; g < groups; g++) {
                    float block_top = -INFINITY;
                    for (int64_t i = 0; i < count; i++) block_top = logits[g * chunk + i] > block_top ? logits[g * chunk + i] : block_top;
                    float new_top = block_top > top[g] ? block_top : top[g];
                    if (new_top == -INFINITY) continue;
                    if (new_top > top[g]) {
                        float rescale = expf(top[g] - new_top);
                        total[g] *= rescale;
                        #pragma omp simd
                        for (int64_t d = 0; d < dim_v; d++) acc[g * dim_v + d] *= rescale;
                        top[g] = new_top;
                    }
                    for (int64_t i = 0; i < count; i++) {
                        float weight = expf(logits[g * chunk + i] - new_top);
                        logits[g * chunk + i] = weight;
                        total[g] += weight;
                    }
                }
                for (int64_t i = 0; i < count; i++) {
                    const float *val = v + b * sv_b + h * sv_h + (start + i) * sv_l;
                    for (int64_t g = 0; g < groups; g++) {
                        float weight = top[g] == -INFINITY ? 0.0f : logits[g * chunk + i];
                        if (weight == 0.0f) continue;
                        float *a = acc + g * dim_v;
                        #pragma omp simd
                        for (int64_t d = 0; d < dim_v; d++) a[d] += weight * val[d];
                    }
                }
            }
            for (int64_t g = 0; g < groups; g++) {
                int64_t head = h * groups + g;
                float *dst = out + (b * kv_heads * groups + head) * dim_v;
                float norm = total[g];
                if (sinks) {
                    float sink = sinks[head];
                    float shift = sink > top[g] ? sink : top[g];
                    float kept = top[g] == -INFINITY ? 0.0f : expf(top[g] - shift);
                    norm = norm * kept + expf(sink - shift);
                    for (int64_t d = 0; d < dim_v; d++) acc[g * dim_v + d] *= kept;
                }
                for (int64_t d = 0; d < dim_v; d++)
                    dst[d] = nan_seen[g] ? NAN : norm == 0.0f ? 0.0f : acc[g * dim_v + d] / norm;
            }
        }
    }
    free(acc); free(top); free(total); free(logits); free(nan_seen);
    return 0;
}
"""


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    # -fopenmp-simd: the loops' simd pragmas only (vectorised dot products), no OpenMP runtime.
    try:
        library = ctypes.CDLL(build_library("gsa_cpu_kernels", _SOURCE, ["-O3", "-fopenmp-simd"], for_this_cpu=True))
    except (NativeUnavailable, OSError) as exc:
        logger.info("CPU kernels score codes with numpy (slower at long caches): %s", exc)
        return None
    function = library.gsa_group_similarity
    function.restype = None
    function.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p,
                         *[ctypes.c_int64] * 5, ctypes.c_int32, ctypes.c_void_p]
    attention = library.gsa_sparse_attention_f32
    attention.restype = ctypes.c_int
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    attention.argtypes = [pointer, size, size, pointer, *[size] * 3, pointer, *[size] * 3, pointer, *[size] * 4,
                          pointer, size, size, pointer, *[size] * 3, pointer, *[size] * 7, ctypes.c_float, pointer]
    return library


def available() -> bool:
    return _library() is not None


def group_similarity(key_codes: torch.Tensor, planes: torch.Tensor, weights: list[int],
                     top: int) -> Optional[torch.Tensor]:
    """float64 [B, H, L]: top - 2 * sum_p weights[p] * hamming(key_codes[b, h, l], planes[b, h, p])
    for uint8 key_codes [B, H, L, R / 8] (any strides over B, H, L) and planes [B, H, P, R / 8];
    None when no compiled library is available."""
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
        batch, heads, num_keys, code_bytes, planes.shape[2], top, out.data_ptr(),
    )
    return out


def sparse_attention_f32(query, key, value, blocks, valid, attn_bias, chunk_size: int, scale: Optional[float],
                         sinks=None) -> Optional[torch.Tensor]:
    """[B, Hq, 1, Dv] float32 attention over the selected blocks (the CPU kernel's contract for
    one query token, float32 tensors, no softcap), or None when the compiled library is not
    available or the inputs are outside what the loop takes."""
    library = _library()
    if library is None or query.shape[2] != 1:
        return None
    if any(t is not None and t.dtype != torch.float32 for t in (query, key, value, attn_bias, sinks)):
        return None
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    blocks = blocks.to(torch.int32)
    batch, q_heads, _, dim = query.shape
    scale = dim ** -0.5 if scale is None else scale
    kv_heads, num_keys, dim_v = key.shape[1], key.shape[2], value.shape[-1]
    out = torch.empty((batch, q_heads, 1, dim_v), dtype=torch.float32)
    valid_bytes = None if valid is None else valid.to(torch.uint8)
    if attn_bias is not None:  # [B, 1 or Hq, 1, L]
        bias_strides = (attn_bias.stride(0), attn_bias.stride(1) if attn_bias.shape[1] > 1 else 0, attn_bias.stride(3))
    sinks = None if sinks is None else sinks.contiguous()
    failed = library.gsa_sparse_attention_f32(
        query.data_ptr(), query.stride(0), query.stride(1),
        key.data_ptr(), *key.stride()[:3], value.data_ptr(), *value.stride()[:3],
        blocks.data_ptr(), *blocks.stride(), blocks.shape[-1],
        None if valid_bytes is None else valid_bytes.data_ptr(),
        *((0, 0) if valid_bytes is None else (valid_bytes.stride(0), valid_bytes.stride(1))),
        None if attn_bias is None else attn_bias.data_ptr(), *((0, 0, 0) if attn_bias is None else bias_strides),
        None if sinks is None else sinks.data_ptr(),
        batch, kv_heads, q_heads // kv_heads, num_keys, dim, dim_v, chunk_size, scale, out.data_ptr(),
    )
    if failed:
        raise MemoryError("gsa CPU sparse attention: no memory for its per-group accumulators")
    return out
