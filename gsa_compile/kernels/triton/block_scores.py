"""Block scores on Triton: XOR + popcount similarity of packed codes, summed over the GQA
group and reduced per block, reading nothing but the packed codes (and the valid mask /
key norms when given).

Output is float64 [B, Hkv, n_blocks]: -inf for a block with no valid token, +inf for a
must-select block that has one, else the block's score. float64 keeps every score exactly
equal to the reference's (integer similarities, products with float32 norms, means over
at most C tokens), so the selection that follows breaks ties identically."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..common import ceil_div, resolve_must_select
from . import runtime

REPRE_CODES = {"max": 0, "min": 1, "sum": 2}
# Must-select block indices travel packed in two int64 scalars, three 20-bit fields each, so a
# CUDA graph replays them as kernel arguments with no host-to-device copy.
MUST_FIELD_BITS = 20
MUST_PER_WORD = 3
MAX_MUST = 2 * MUST_PER_WORD
MAX_BLOCKS = (1 << MUST_FIELD_BITS) - 1
# Tokens each program scores (several whole blocks when blocks are small), and its warps.
TOKENS_PER_PROGRAM = 512
NUM_WARPS = 4


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
def _is_must(block, packed, NUM: tl.constexpr, FIELD_BITS: tl.constexpr):
    hit = block < 0
    for j in tl.static_range(NUM):
        hit = hit | (block == ((packed >> (FIELD_BITS * j)) & ((1 << FIELD_BITS) - 1)))
    return hit


@triton.jit
def _block_score_kernel(
    qc_ptr, kc_ptr, valid_ptr, norm_ptr, out_ptr,
    kv_heads, num_keys, n_blocks, must_lo, must_hi,
    sq_b, sq_h,
    sk_b, sk_h, sk_l,
    sv_b, sv_l,
    sn_b, sn_h, sn_l,
    GROUPS: tl.constexpr, GROUP_BITS: tl.constexpr, NUM_WORDS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    REPRE: tl.constexpr, HAS_VALID: tl.constexpr, HAS_NORMS: tl.constexpr,
    MUST_LO: tl.constexpr, MUST_HI: tl.constexpr, FIELD_BITS: tl.constexpr, USE_POPC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    h = pid_bh % kv_heads

    blocks = pid_c * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    within = tl.arange(0, BLOCK_C)
    tokens = blocks[:, None] * CHUNK + within[None, :]
    ok = (within[None, :] < CHUNK) & (tokens < num_keys)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + b * sv_b + tokens * sv_l, mask=ok, other=0) != 0)

    # One 2-D [blocks, tokens] tile per code word, the query's words as scalars: the XOR and
    # popcount run on plain registers with no cross-thread reduction over words.
    hamming = tl.zeros([BLOCKS_PER_PROGRAM, BLOCK_C], dtype=tl.int32)
    key_base = kc_ptr + b * sk_b + h * sk_h + tokens * sk_l
    for w in tl.static_range(NUM_WORDS):
        key_word = tl.load(key_base + w, mask=ok, other=0).to(tl.int32)
        for g in tl.static_range(GROUPS):
            query_word = tl.load(qc_ptr + b * sq_b + (h * GROUPS + g) * sq_h + w).to(tl.int32)
            hamming += _popcount(key_word ^ query_word, USE_POPC)
    # sum over the group of (R - 2 * hamming): the +-1 dot product of the codes.
    similarity = GROUP_BITS - 2 * hamming
    count = tl.sum(ok.to(tl.int32), axis=1)
    if HAS_NORMS:
        norms = tl.load(norm_ptr + b * sn_b + h * sn_h + tokens * sn_l, mask=ok, other=0.0)
        weighted = similarity.to(tl.float64) * norms.to(tl.float64)
        if REPRE == 0:
            score = tl.max(tl.where(ok, weighted, float("-inf")), axis=1)
        elif REPRE == 1:
            score = tl.min(tl.where(ok, weighted, float("inf")), axis=1)
        else:
            score = tl.sum(tl.where(ok, weighted, 0.0), axis=1) / tl.maximum(count, 1).to(tl.float64)
    else:
        # Plain similarities are integers: reduce in int32, convert once per block.
        if REPRE == 0:
            score = tl.max(tl.where(ok, similarity, -GROUP_BITS - 1), axis=1).to(tl.float64)
        elif REPRE == 1:
            score = tl.min(tl.where(ok, similarity, GROUP_BITS + 1), axis=1).to(tl.float64)
        else:
            total = tl.sum(tl.where(ok, similarity, 0), axis=1)
            score = total.to(tl.float64) / tl.maximum(count, 1).to(tl.float64)
    must = _is_must(blocks, must_lo, MUST_LO, FIELD_BITS) | _is_must(blocks, must_hi, MUST_HI, FIELD_BITS)
    score = tl.where(must, float("inf"), score)
    score = tl.where(count > 0, score, float("-inf"))
    tl.store(out_ptr + pid_bh * n_blocks + blocks, score, mask=blocks < n_blocks)


def _pack_must(indices: Sequence[int]) -> tuple[int, int, int, int]:
    """(lo word, hi word, fields used in lo, fields used in hi)."""
    words = [0, 0]
    for j, index in enumerate(indices):
        words[j // MUST_PER_WORD] |= index << (MUST_FIELD_BITS * (j % MUST_PER_WORD))
    count = len(indices)
    return words[0], words[1], min(count, MUST_PER_WORD), max(0, count - MUST_PER_WORD)


def block_scores(
    query_codes: torch.Tensor, key_codes: torch.Tensor, valid: Optional[torch.Tensor],
    key_norms: Optional[torch.Tensor], chunk_size: int, must_select: Sequence[int], repre: str,
) -> torch.Tensor:
    """query_codes [B, Hq, 1, R/8], key_codes [B, Hkv, L, R/8] -> float64 [B, Hkv, n_blocks]."""
    batch, kv_heads, num_keys, num_bytes = key_codes.shape
    groups = query_codes.shape[1] // kv_heads
    n_blocks = ceil_div(num_keys, chunk_size)
    key_words = runtime.code_words(key_codes)
    query_words = query_codes.contiguous().view(key_words.dtype)
    num_words = key_words.shape[-1]
    block_c = runtime.next_power_of_2(chunk_size)
    per_program = max(1, min(runtime.next_power_of_2(n_blocks), TOKENS_PER_PROGRAM // block_c))
    lo, hi, used_lo, used_hi = _pack_must(resolve_must_select(must_select, n_blocks))
    out = torch.empty((batch, kv_heads, n_blocks), dtype=torch.float64, device=key_codes.device)
    # An absent input still needs a pointer argument; HAS_VALID / HAS_NORMS keep it unread.
    valid_arg = valid.view(torch.uint8) if valid is not None else key_codes
    norms_arg = key_norms if key_norms is not None else key_codes
    grid = (ceil_div(n_blocks, per_program), batch * kv_heads)
    _block_score_kernel[grid](
        query_words, key_words, valid_arg, norms_arg, out,
        kv_heads, num_keys, n_blocks, lo, hi,
        query_words.stride(0), query_words.stride(1),
        key_words.stride(0), key_words.stride(1), key_words.stride(2),
        *(valid_arg.stride() if valid is not None else (0, 0)),
        *(key_norms.stride() if key_norms is not None else (0, 0, 0)),
        GROUPS=groups, GROUP_BITS=groups * 8 * num_bytes, NUM_WORDS=num_words,
        CHUNK=chunk_size, BLOCK_C=block_c,
        BLOCKS_PER_PROGRAM=per_program, REPRE=REPRE_CODES[repre],
        HAS_VALID=valid is not None, HAS_NORMS=key_norms is not None,
        MUST_LO=used_lo, MUST_HI=used_hi, FIELD_BITS=MUST_FIELD_BITS, USE_POPC=not runtime.INTERPRETING,
        num_warps=NUM_WARPS,
    )
    return out


def block_scores_reason(num_keys: int, chunk_size: int, must_select: Sequence[int], groups: int) -> Optional[str]:
    n_blocks = ceil_div(num_keys, chunk_size)
    if n_blocks > MAX_BLOCKS:
        return f"{n_blocks} blocks; the Triton scorer indexes at most {MAX_BLOCKS}"
    must = resolve_must_select(must_select, n_blocks)
    if len(must) > MAX_MUST:
        return f"{len(must)} must-select blocks; the Triton scorer takes at most {MAX_MUST}"
    if groups > 64:
        return f"{groups} query heads per KV head; the Triton scorer unrolls at most 64"
    return None
