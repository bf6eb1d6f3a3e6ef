"""gsa::sparse_attention on Triton: split-KV flash decoding over the selected blocks.

One program takes one (batch row, KV head) and every num_splits-th of its selected blocks.
Selections list their blocks first and -1 after them, so each program first counts the row's
entries >= 0 (on the device) and loops over its share of those only: one compiled kernel serves
16 selected blocks or every block of the cache, with work proportional to what is selected and
no host read (it replays in a CUDA graph). The G query heads of the GQA group ride together as the rows of one matrix product, so each
selected K/V tile is read from memory once for the whole group. Every program keeps an online
softmax (running max, sum, weighted V) and writes it as a partial; a merge kernel combines the
partials of a row (a program with no block writes an empty partial) and adds an attention sink's
exp(sink) to the denominator where one is given. Invalid tokens are masked loads, which move no
bytes."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common import ceil_div
from . import runtime

# Programs per multiprocessor the split count aims for, so small batches still fill the GPU.
PROGRAMS_PER_SM = 4
# Entries of a selection row each program reads at once while counting the selected blocks.
COUNT_TILE = 128


@triton.jit
def _selected_count(row_ptr, num_slots, stride, COUNT_TILE: tl.constexpr):
    """Entries >= 0 of one selection row (they come first, -1 after them)."""
    count = tl.zeros([], dtype=tl.int32)
    for start in range(0, num_slots, COUNT_TILE):
        slots = start + tl.arange(0, COUNT_TILE)
        entries = tl.load(row_ptr + slots * stride, mask=slots < num_slots, other=-1)
        count += tl.sum((entries >= 0).to(tl.int32), axis=0)
    return count


@triton.jit
def _sparse_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, blocks_ptr, valid_ptr, bias_ptr,
    acc_ptr, max_ptr, sum_ptr,
    kv_heads, num_keys, num_slots, num_splits, scale, softcap,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    sv_b, sv_h, sv_l, sv_d,
    sb_b, sb_h, sb_k,
    sm_b, sm_l,
    sa_b, sa_h, sa_l,
    GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_PER_HEAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    COUNT_TILE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    # int64: offsets of the row and head pass 2**31 elements on large caches (128 heads at 128K keys).
    b = (pid_bh // kv_heads).to(tl.int64)
    h = (pid_bh % kv_heads).to(tl.int64)

    group = tl.arange(0, BLOCK_G)
    head = h * GROUPS + group
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + dims[None, :] * sq_d,
                mask=(group[:, None] < GROUPS) & (dims[None, :] < DIM), other=0.0)

    running_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)

    row_ptr = blocks_ptr + b * sb_b + h * sb_h
    # Slots split, split + num_splits, ... below the row's count: ceil((count - split) / splits) of them.
    count = _selected_count(row_ptr, num_slots, sb_k, COUNT_TILE)
    mine = tl.maximum(count - split + num_splits - 1, 0) // num_splits
    within = tl.arange(0, BLOCK_N)
    for tile in tl.range(0, mine * TILES_PER_BLOCK, num_stages=NUM_STAGES):
        block = tl.load(row_ptr + (split + (tile // TILES_PER_BLOCK) * num_splits) * sb_k)
        offset = (tile % TILES_PER_BLOCK) * BLOCK_N + within
        tokens = block * CHUNK + offset
        # A -1 inside the counted prefix (a caller breaking the layout) reads nothing; vector-only
        # masks also suit the interpreter.
        ok = (tokens >= 0) & (offset < CHUNK) & (tokens < num_keys)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * sm_b + tokens * sm_l, mask=ok, other=0) != 0)

        keys = tl.load(k_ptr + b * sk_b + h * sk_h + tokens[:, None] * sk_l + dims[None, :] * sk_d,
                       mask=ok[:, None] & (dims[None, :] < DIM), other=0.0)
        if FP32_DOT:
            logits = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(keys))
        logits = logits * scale
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1), exact at both saturations.
            logits = softcap * (1.0 - 2.0 / (tl.exp(2.0 * logits / softcap) + 1.0))
        if HAS_BIAS:
            if BIAS_PER_HEAD:
                bias = tl.load(bias_ptr + b * sa_b + head[:, None] * sa_h + tokens[None, :] * sa_l,
                               mask=(group[:, None] < GROUPS) & ok[None, :], other=0.0)
            else:
                bias = tl.load(bias_ptr + b * sa_b + tokens[None, :] * sa_l, mask=ok[None, :], other=0.0)
            logits = logits + bias.to(tl.float32)
        logits = tl.where(ok[None, :], logits, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # A row that has seen only -inf so far keeps a zero shift, so no inf - inf appears.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        probs = tl.exp(logits - shift[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        values = tl.load(v_ptr + b * sv_b + h * sv_h + tokens[:, None] * sv_l + dims_v[None, :] * sv_d,
                         mask=ok[:, None] & (dims_v[None, :] < DIM_V), other=0.0)
        if FP32_DOT:
            acc = acc * rescale[:, None] + tl.dot(probs, values.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values)
        running_max = new_max

    part = pid_bh * num_splits + split
    rows_ok = group < GROUPS
    tl.store(max_ptr + part * BLOCK_G + group, running_max, mask=rows_ok)
    tl.store(sum_ptr + part * BLOCK_G + group, running_sum, mask=rows_ok)
    tl.store(acc_ptr + (part * BLOCK_G + group[:, None]) * BLOCK_DV + dims_v[None, :], acc,
             mask=rows_ok[:, None] & (dims_v[None, :] < DIM_V))


@triton.jit
def _merge_splits_kernel(
    acc_ptr, max_ptr, sum_ptr, sinks_ptr, out_ptr, q_heads, num_splits,
    so_b, so_h, so_d,
    GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // q_heads
    head = pid % q_heads
    pair = pid // GROUPS
    g = head % GROUPS
    splits = tl.arange(0, BLOCK_S)
    dims_v = tl.arange(0, BLOCK_DV)
    split_ok = splits < num_splits
    part = (pair * num_splits + splits) * BLOCK_G + g
    maxes = tl.load(max_ptr + part, mask=split_ok, other=float("-inf"))
    sums = tl.load(sum_ptr + part, mask=split_ok, other=0.0)
    accs = tl.load(acc_ptr + part[:, None] * BLOCK_DV + dims_v[None, :],
                   mask=split_ok[:, None] & (dims_v[None, :] < DIM_V), other=0.0)
    top = tl.max(maxes, axis=0)
    if HAS_SINKS:
        # The head's sink logit joins the denominator (with no value): the shift covers it too.
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        top = tl.maximum(top, sink)
    weights = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - tl.where(top == float("-inf"), 0.0, top)))
    total = tl.sum(weights * sums, axis=0)
    if HAS_SINKS:
        total += tl.exp(sink - top)
    # A head with no attendable key returns zeros, as the reference does.
    out = tl.sum(weights[:, None] * accs, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * so_b + head * so_h + dims_v * so_d, out.to(out_ptr.dtype.element_ty), mask=dims_v < DIM_V)


def split_count(pairs: int, num_slots: int, device_index: Optional[int]) -> int:
    """Programs per (row, KV head): enough to fill the device, no more than the slots."""
    target = PROGRAMS_PER_SM * runtime.multiprocessor_count(device_index)
    return max(1, min(num_slots, ceil_div(target, pairs)))


def tile_config(chunk_size: int, dim: int, dim_v: int) -> tuple[int, int, int]:
    """(BLOCK_N tokens per tile, num_warps, num_stages) for this head size."""
    # H200 sweep at d 128 (benchmarks/NOTES_gpu.md): tiles of 32-128 tokens, 4-8 warps and
    # 2-4 stages all land within noise; 64 x 2 stages keeps shared memory for 3 programs/SM.
    widest = max(runtime.next_power_of_2(dim), runtime.next_power_of_2(dim_v))
    block_n = 64 if widest <= 128 else (32 if widest <= 256 else 16)
    block_n = min(block_n, max(16, runtime.next_power_of_2(chunk_size)))
    return block_n, 4 if widest <= 128 else 8, 2


def sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap, sinks=None) -> torch.Tensor:
    batch, q_heads, _, dim = query.shape
    kv_heads, num_keys, dim_v = key.shape[1], key.shape[2], value.shape[-1]
    groups = q_heads // kv_heads
    num_slots = blocks.shape[-1]
    out = torch.empty((batch, q_heads, 1, dim_v), dtype=query.dtype, device=query.device)
    if num_slots == 0:
        return out.zero_()
    block_g = max(16, runtime.next_power_of_2(groups))
    block_dv = max(16, runtime.next_power_of_2(dim_v))
    splits = split_count(batch * kv_heads, num_slots, runtime.device_index(query))
    block_n, num_warps, num_stages = tile_config(chunk_size, dim, dim_v)
    parts = batch * kv_heads * splits * block_g
    acc = torch.empty((parts, block_dv), dtype=torch.float32, device=query.device)
    maxes = torch.empty((parts,), dtype=torch.float32, device=query.device)
    sums = torch.empty((parts,), dtype=torch.float32, device=query.device)
    valid_arg = valid.view(torch.uint8) if valid is not None else blocks
    bias_arg = attn_bias if attn_bias is not None else blocks
    bias_strides = (0, 0, 0) if attn_bias is None else (attn_bias.stride(0), attn_bias.stride(1), attn_bias.stride(3))
    # The interpreter's bfloat16 tl.dot returns garbage (triton 3.9), so interpreting upcasts.
    fp32_dot = query.dtype == torch.float32 or runtime.INTERPRETING
    _sparse_decode_split_kernel[(batch * kv_heads, splits)](
        query, key, value, blocks, valid_arg, bias_arg, acc, maxes, sums,
        kv_heads, num_keys, num_slots, splits,
        dim ** -0.5 if scale is None else scale, 1.0 if softcap is None else softcap,
        query.stride(0), query.stride(1), query.stride(3),
        *key.stride(), *value.stride(), *blocks.stride(),
        *(valid_arg.stride() if valid is not None else (0, 0)),
        *bias_strides,
        GROUPS=groups, BLOCK_G=block_g, DIM=dim, BLOCK_D=max(16, runtime.next_power_of_2(dim)),
        DIM_V=dim_v, BLOCK_DV=block_dv, CHUNK=chunk_size, BLOCK_N=block_n,
        TILES_PER_BLOCK=ceil_div(chunk_size, block_n), HAS_VALID=valid is not None,
        HAS_BIAS=attn_bias is not None, BIAS_PER_HEAD=attn_bias is not None and attn_bias.shape[1] > 1,
        HAS_SOFTCAP=softcap is not None, FP32_DOT=fp32_dot, NUM_STAGES=num_stages, COUNT_TILE=COUNT_TILE,
        num_warps=num_warps,
    )
    _merge_splits_kernel[(batch * q_heads,)](
        acc, maxes, sums, sinks.contiguous() if sinks is not None else maxes, out, q_heads, splits,
        out.stride(0), out.stride(1), out.stride(3),
        GROUPS=groups, BLOCK_G=block_g, DIM_V=dim_v, BLOCK_DV=block_dv,
        BLOCK_S=max(2, runtime.next_power_of_2(splits)), HAS_SINKS=sinks is not None,
    )
    return out


def sparse_attention_supports(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap,
                              sinks=None) -> Optional[str]:
    groups = query.shape[1] // key.shape[1]
    return runtime.first_reason(
        runtime.device_reason(query, key, value, blocks, valid, attn_bias, sinks),
        runtime.dtype_reason("query", query),
        runtime.head_dim_reason("key head dim", key.shape[-1]),
        runtime.head_dim_reason("value head dim", value.shape[-1]),
        None if groups <= 128 else f"{groups} query heads per KV head; the Triton decode kernel takes at most 128",
    )
