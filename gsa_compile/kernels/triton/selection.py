"""gsa::select_blocks on Triton: the query's sign planes, block scores from packed codes, then
a top-k per (batch row, KV head) that needs no sort and no host synchronisation.

The top-k holds a row's block scores in registers. It resolves the must-select blocks against
the row's own length (its last block with a valid token: a static cache's unused tail does not
move the recent window) and caps the row at its `limit` entry when one is given. It finds the
k-th largest score by building its order-preserving integer key a few bits at a time (each pass
counts the row against 8 or 16 candidate thresholds at once, all in registers: 3 passes for
plain max/min scores of 4 heads x 128 bits, 21 for float scores), takes every block above it
and the lowest-indexed blocks equal to it (ties to the lower index, as the reference's stable
sort), and writes the chosen indices in ascending order by a prefix sum, -1 after them.
Output size is fixed by num_blocks, so the whole selection replays inside a CUDA graph."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..common import ceil_div
from . import runtime
from .block_scores import block_scores, block_scores_reason
from .hash_encode import encode_supports, query_planes

# One program holds a whole row of block scores in registers.
MAX_ROW_BLOCKS = 1 << 15
# Must-select indices (negatives kept as given: each row resolves them) travel packed in two
# int64 scalars, three biased 20-bit fields each, so a CUDA graph replays them as kernel
# arguments with no host-to-device copy.
MUST_FIELD_BITS = 20
MUST_PER_WORD = 3
MAX_MUST = 2 * MUST_PER_WORD


@triton.jit
def _is_must(block, row_blocks, packed, NUM: tl.constexpr, FIELD_BITS: tl.constexpr):
    hit = block < 0
    for j in tl.static_range(NUM):
        must = ((packed >> (FIELD_BITS * j)) & ((1 << FIELD_BITS) - 1)) - (1 << (FIELD_BITS - 1))
        hit = hit | (block == tl.where(must >= 0, must, row_blocks + must))
    return hit


@triton.jit
def _top_blocks_kernel(
    scores_ptr, out_ptr, limit_ptr, n_blocks, num_blocks, heads, must_lo, must_hi,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTEGER_SPAN: tl.constexpr, KEY_BITS: tl.constexpr,
    RADIX_BITS: tl.constexpr, MUST_LO: tl.constexpr, MUST_HI: tl.constexpr, FIELD_BITS: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
):
    row = tl.program_id(0)
    index = tl.arange(0, BLOCK_N)
    scores = tl.load(scores_ptr + row * n_blocks + index, mask=index < n_blocks, other=float("-inf"))
    selectable = scores > float("-inf")
    # The row's length in blocks: up to its last block with a valid token.
    row_blocks = tl.max(tl.where(selectable, index + 1, 0), axis=0)
    must = (_is_must(index, row_blocks, must_lo, MUST_LO, FIELD_BITS)
            | _is_must(index, row_blocks, must_hi, MUST_HI, FIELD_BITS))
    scores = tl.where(must & selectable, float("inf"), scores)
    wanted = tl.minimum(num_blocks, tl.sum(selectable.to(tl.int32), axis=0))
    if HAS_LIMIT:
        wanted = tl.minimum(wanted, tl.maximum(tl.load(limit_ptr + row // heads).to(tl.int32), 0))
    if INTEGER_SPAN > 0:
        # Integer scores in [-span, span]: keys 0..2*span, must-select above, never-select -1,
        # so the search covers only bit_length(2 * span + 1) bits instead of 64.
        keys = tl.where(scores == float("inf"), 2 * INTEGER_SPAN + 1,
                        tl.where(selectable, scores + INTEGER_SPAN, -1.0)).to(tl.int64)
        threshold = tl.zeros([], dtype=tl.int64)
    else:
        # Order-preserving map of float64 onto int64: negatives flip every bit but the sign.
        bits = scores.to(tl.int64, bitcast=True)
        keys = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        non_negative = tl.sum((keys >= 0).to(tl.int32), axis=0) >= wanted
        threshold = tl.where(non_negative, 0, -9223372036854775807 - 1).to(tl.int64)
    # The k-th largest key, built from the top bit down RADIX_BITS at a time: in two's
    # complement setting lower bits always raises the value, so each pass keeps the largest
    # digit that still leaves at least `wanted` keys >= the threshold (digit 0 always does).
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
    for i in range(KEY_BITS // RADIX_BITS):
        shift = KEY_BITS - RADIX_BITS * (i + 1)
        candidates = threshold | (digits << shift)
        at_least = tl.sum((keys[None, :] >= candidates[:, None]).to(tl.int32), axis=1)
        threshold = threshold | (tl.max(tl.where(at_least >= wanted, digits, 0), axis=0) << shift)

    above = selectable & (keys > threshold)
    tied = selectable & (keys == threshold)
    room = wanted - tl.sum(above.to(tl.int32), axis=0)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * num_blocks + slot, index.to(tl.int32), mask=chosen)

    tail = tl.arange(0, BLOCK_K)
    tl.store(out_ptr + row * num_blocks + tail, tl.full([BLOCK_K], -1, dtype=tl.int32),
             mask=(tail >= wanted) & (tail < num_blocks))


def topk_num_warps(block_n: int) -> int:
    """Warps for a row of block_n scores: each search pass compares every score with
    2**RADIX_BITS candidates, about 128 comparisons per thread at 4 warps per 1024 blocks."""
    return max(1, min(16, block_n // 256))


def _pack_must(must_select: Sequence[int], n_blocks: int) -> tuple[int, int, int, int]:
    """(lo word, hi word, fields used in lo, fields used in hi) of the distinct must-select
    indices that some row can resolve (non-negative below n_blocks, negative down to -n_blocks)."""
    indices = must_values(must_select, n_blocks)
    words = [0, 0]
    for j, index in enumerate(indices):
        field = index + (1 << (MUST_FIELD_BITS - 1))
        words[j // MUST_PER_WORD] |= field << (MUST_FIELD_BITS * (j % MUST_PER_WORD))
    count = len(indices)
    return words[0], words[1], min(count, MUST_PER_WORD), max(0, count - MUST_PER_WORD)


def must_values(must_select: Sequence[int], n_blocks: int) -> list[int]:
    """The distinct must-select indices some row of n_blocks blocks can resolve, in order."""
    return list(dict.fromkeys(m for m in must_select if -n_blocks <= m < n_blocks))


def top_blocks(
    scores: torch.Tensor, num_blocks: int, integer_span: int = 0, must_select: Sequence[int] = (),
    limit: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float64 [B, H, n] (-inf never, +inf always) -> int32 [B, H, num_blocks]: must-select
    blocks (resolved per row) first, then the best, at most limit[b] per row when given.
    integer_span > 0 promises every finite score is an integer in [-span, span]."""
    batch, heads, n_blocks = scores.shape
    scores = scores.contiguous()
    out = torch.empty((batch, heads, num_blocks), dtype=torch.int32, device=scores.device)
    block_n = max(16, runtime.next_power_of_2(n_blocks))
    # Integer keys: 4-bit digits over bit_length(2 * span + 1) bits rounded up (3 passes for
    # 4 heads x 128 bits); float keys: 3-bit digits over the 63 bits below the sign (21 passes).
    radix_bits = 4 if integer_span else 3
    key_bits = ceil_div((2 * integer_span + 1).bit_length(), radix_bits) * radix_bits if integer_span else 63
    lo, hi, used_lo, used_hi = _pack_must(must_select, n_blocks)
    _top_blocks_kernel[(batch * heads,)](
        scores, out, limit if limit is not None else out, n_blocks, num_blocks, heads, lo, hi,
        BLOCK_N=block_n, BLOCK_K=max(16, runtime.next_power_of_2(num_blocks)),
        INTEGER_SPAN=integer_span, KEY_BITS=key_bits, RADIX_BITS=radix_bits,
        MUST_LO=used_lo, MUST_HI=used_hi, FIELD_BITS=MUST_FIELD_BITS, HAS_LIMIT=limit is not None,
        num_warps=topk_num_warps(block_n),
    )
    return out


def select_blocks(
    query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope, limit=None
) -> torch.Tensor:
    groups = query.shape[1] // key_codes.shape[1]
    planes = query_planes(query, weight)
    scores = block_scores(planes, key_codes, valid, key_norms, chunk_size, repre, groups)
    # Best or worst token of plain similarities is an integer within +-(group size * bits).
    integer_span = groups * weight.shape[-1] if key_norms is None and repre in ("max", "min") else 0
    if scope == "shared":
        shared = top_blocks(scores.amax(dim=1, keepdim=True), num_blocks, integer_span, must_select, limit)
        return shared.expand(-1, key_codes.shape[1], -1).contiguous()
    return top_blocks(scores, num_blocks, integer_span, must_select, limit)


def select_blocks_supports(
    query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select: Sequence[int], repre, scope,
    limit=None,
) -> Optional[str]:
    n_blocks = ceil_div(key_codes.shape[2], chunk_size)
    must = must_values(must_select, n_blocks)
    return runtime.first_reason(
        runtime.device_reason(query, key_codes, valid, key_norms, limit),
        encode_supports(query, weight),
        block_scores_reason(query.shape[1] // key_codes.shape[1]),
        None if len(must) <= MAX_MUST else f"{len(must)} must-select blocks; the Triton top-k takes at most {MAX_MUST}",
        None if n_blocks <= MAX_ROW_BLOCKS else f"{n_blocks} blocks per row; the Triton top-k holds at most {MAX_ROW_BLOCKS}",
        None if num_blocks <= MAX_ROW_BLOCKS else f"num_blocks={num_blocks}; the Triton top-k writes at most {MAX_ROW_BLOCKS}",
    )
