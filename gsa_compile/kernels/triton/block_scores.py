"""Block scores on Triton: similarity of packed codes, summed over the GQA group and reduced per
block, reading nothing but the packed codes (and the valid mask / key norms when given).

The group's similarity to a key, sum_i (R - 2 hamming(q_i, k)), is the dot product of the key's
+-1 code with S, the group sum of the query signs. S is handed over as 1 + log2(G) packed +-1
planes (kernels.common.plane_layout) with weights w_p, and S . k = sum_p w_p (R - 2 hamming(
plane_p, k)): one XOR + popcount per plane and code word, and an even group's two weight-1
planes share one popcount, so groups 1, 2, 4, 8, 16, 128 cost 1, 1, 2, 3, 4, 7 popcounts per word
(instead of G) and the kernel stays bound by reading the codes at every group size.

Output is float64 [B, Hkv, n_blocks]: -inf for a block with no valid token, else the block's
score. float64 keeps every score exactly equal to the reference's (integer similarities,
products with float32 norms, means over at most C tokens), so the selection that follows
breaks ties identically."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..common import ceil_div, plane_layout, plane_weights
from . import runtime

REPRE_CODES = {"max": 0, "min": 1, "sum": 2}
# Tokens each program scores (several whole blocks when blocks are small), and its warps.
TOKENS_PER_PROGRAM = 512
NUM_WARPS = 4
# Query heads per KV head the plane kernel and the scorer take (11 planes at 1024; MLA's
# latent selection groups all 128 heads of DeepSeek-V3: 8 planes). Scores stay exact in int32.
MAX_GROUPS = 1024


@triton.jit
def _popcount(x, USE_POPC: tl.constexpr):
    if USE_POPC:
        return libdevice.popc(x)
    else:
        # The interpreter has no popc: the classic SWAR count on unsigned 32-bit words.
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _block_score_kernel(
    pl_ptr, kc_ptr, valid_ptr, norm_ptr, out_ptr,
    kv_heads, num_keys, n_blocks,
    sp_b, sp_h, sp_p,
    sk_b, sk_h, sk_l,
    sv_b, sv_l,
    sn_b, sn_h, sn_l,
    NUM_PLANES: tl.constexpr, DIRECT: tl.constexpr, TOP: tl.constexpr, GROUP_BITS: tl.constexpr,
    NUM_WORDS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    REPRE: tl.constexpr, HAS_VALID: tl.constexpr, HAS_NORMS: tl.constexpr, USE_POPC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64: offsets of the row and head pass 2**31 bytes on large caches (128 heads at 128K keys).
    b = (pid_bh // kv_heads).to(tl.int64)
    h = (pid_bh % kv_heads).to(tl.int64)

    blocks = pid_c * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    within = tl.arange(0, BLOCK_C)
    tokens = blocks[:, None] * CHUNK + within[None, :]
    ok = (within[None, :] < CHUNK) & (tokens < num_keys)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + b * sv_b + tokens * sv_l, mask=ok, other=0) != 0)

    # One 2-D [blocks, tokens] tile per code word, the planes' words as scalars: the XOR and
    # popcount run on plain registers with no cross-thread reduction over words.
    # weighted = sum_p w_p hamming(plane_p, k), so that sum_p w_p (R - 2 hamming(plane_p, k)),
    # the group's +-1 dot product with the key, is TOP - 2 * weighted.
    weighted = tl.zeros([BLOCKS_PER_PROGRAM, BLOCK_C], dtype=tl.int32)
    shared_bits = tl.zeros([], dtype=tl.int32)
    key_base = kc_ptr + b * sk_b + h * sk_h + tokens * sk_l
    plane_base = pl_ptr + b * sp_b + h * sp_h
    for w in tl.static_range(NUM_WORDS):
        key_word = tl.load(key_base + w, mask=ok, other=0).to(tl.int32)
        if DIRECT:
            # The two weight-1 planes a, b of an even group in one popcount: with x = a ^ k and
            # y = b ^ k, popc(x) + popc(y) = popc(a ^ b) + 2 popc(x & y), and a ^ b holds no key.
            first = tl.load(plane_base + w).to(tl.int32)
            second = tl.load(plane_base + sp_p + w).to(tl.int32)
            shared_bits += _popcount(first ^ second, USE_POPC)
            weighted += _popcount((key_word ^ first) & (key_word ^ second), USE_POPC) << 1
        # Plane p >= 2 * DIRECT weighs 2 ** (p - DIRECT).
        for p in tl.static_range(2 * DIRECT, NUM_PLANES):
            plane_word = tl.load(plane_base + p * sp_p + w).to(tl.int32)
            weighted += _popcount(key_word ^ plane_word, USE_POPC) << (p - DIRECT)
    similarity = TOP - 2 * (weighted + shared_bits)
    count = tl.sum(ok.to(tl.int32), axis=1)
    if HAS_NORMS:
        norms = tl.load(norm_ptr + b * sn_b + h * sn_h + tokens * sn_l, mask=ok, other=0.0)
        weighted_norms = similarity.to(tl.float64) * norms.to(tl.float64)
        if REPRE == 0:
            score = tl.max(tl.where(ok, weighted_norms, float("-inf")), axis=1)
        elif REPRE == 1:
            score = tl.min(tl.where(ok, weighted_norms, float("inf")), axis=1)
        else:
            score = tl.sum(tl.where(ok, weighted_norms, 0.0), axis=1) / tl.maximum(count, 1).to(tl.float64)
    else:
        # Plain similarities are integers in [-G * R, G * R]: reduce in int32, convert once per block.
        if REPRE == 0:
            score = tl.max(tl.where(ok, similarity, -GROUP_BITS - 1), axis=1).to(tl.float64)
        elif REPRE == 1:
            score = tl.min(tl.where(ok, similarity, GROUP_BITS + 1), axis=1).to(tl.float64)
        else:
            total = tl.sum(tl.where(ok, similarity, 0), axis=1)
            score = total.to(tl.float64) / tl.maximum(count, 1).to(tl.float64)
    score = tl.where(count > 0, score, float("-inf"))
    tl.store(out_ptr + pid_bh * n_blocks + blocks, score, mask=blocks < n_blocks)


def block_scores(
    planes: torch.Tensor, key_codes: torch.Tensor, valid: Optional[torch.Tensor],
    key_norms: Optional[torch.Tensor], chunk_size: int, repre: str, groups: int,
) -> torch.Tensor:
    """planes [B, Hkv, P, R/8] (hash_encode.query_planes), key_codes [B, Hkv, L, R/8] ->
    float64 [B, Hkv, n_blocks]."""
    batch, kv_heads, num_keys, num_bytes = key_codes.shape
    n_blocks = ceil_div(num_keys, chunk_size)
    key_words = runtime.code_words(key_codes)
    plane_words = planes.contiguous().view(key_words.dtype)
    num_words = key_words.shape[-1]
    block_c = runtime.next_power_of_2(chunk_size)
    per_program = max(1, min(runtime.next_power_of_2(n_blocks), TOKENS_PER_PROGRAM // block_c))
    out = torch.empty((batch, kv_heads, n_blocks), dtype=torch.float64, device=key_codes.device)
    # An absent input still needs a pointer argument; HAS_VALID / HAS_NORMS keep it unread.
    valid_arg = valid.view(torch.uint8) if valid is not None else key_codes
    norms_arg = key_norms if key_norms is not None else key_codes
    grid = (ceil_div(n_blocks, per_program), batch * kv_heads)
    _block_score_kernel[grid](
        plane_words, key_words, valid_arg, norms_arg, out,
        kv_heads, num_keys, n_blocks,
        *plane_words.stride()[:3],
        key_words.stride(0), key_words.stride(1), key_words.stride(2),
        *(valid_arg.stride() if valid is not None else (0, 0)),
        *(key_norms.stride() if key_norms is not None else (0, 0, 0)),
        NUM_PLANES=planes.shape[2], DIRECT=plane_layout(groups)[0],
        TOP=sum(plane_weights(groups)) * 8 * num_bytes, GROUP_BITS=groups * 8 * num_bytes,
        NUM_WORDS=num_words, CHUNK=chunk_size, BLOCK_C=block_c,
        BLOCKS_PER_PROGRAM=per_program, REPRE=REPRE_CODES[repre],
        HAS_VALID=valid is not None, HAS_NORMS=key_norms is not None, USE_POPC=not runtime.INTERPRETING,
        num_warps=NUM_WARPS,
    )
    return out


def block_scores_reason(groups: int) -> Optional[str]:
    if groups > MAX_GROUPS:
        return f"{groups} query heads per KV head; the Triton scorer takes at most {MAX_GROUPS}"
    return None
