"""The gsa custom ops (torch.library, namespace `gsa`): what graphs hold after rewriting.

Each op validates its inputs (also on fake tensors while tracing), has a fake implementation
with fixed-size outputs, and runs through the one dispatcher in gsa_compile.kernels.

- gsa::encode            keys (or queries) -> packed hash codes
- gsa::select_blocks     query + cached codes -> top-k block indices per (row, KV head)
- gsa::sparse_attention  exact attention over the selected blocks
- gsa::attention         one whole attention site: the dense-fallback rules (gsa_compile.decode),
                         then selection (or a reused selection) and sparse attention

`ops.encode`, `ops.select_blocks`, `ops.sparse_attention` and `ops.attention` are what callers
use: traced, they put the op into the graph; in plain eager inference they run its
implementation without the dispatcher's Python layers (the same checks and kernels).

The ops are inference-only: each has an autograd formula that refuses backward with a clear
error, so a forward under grad mode works and a backward says why it cannot.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import decode, kernels
from .errors import GSAError
from .kernels import reference
from .kernels import validation as check

logger = logging.getLogger(__name__)

def _encode(x: Tensor, weight: Tensor) -> Tensor:
    check.check_encode(x, weight)
    return kernels.dispatch("encode", x.device.type, x, weight)


encode_op = torch.library.custom_op("gsa::encode", mutates_args=())(_encode)


@encode_op.register_fake
def _encode_fake(x, weight):
    check.check_encode(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[-1] // 8), dtype=torch.uint8)


def _select_blocks(
    query: Tensor, key_codes: Tensor, weight: Tensor, valid: Optional[Tensor], key_norms: Optional[Tensor],
    chunk_size: int, num_blocks: int, must_select: Sequence[int], repre: str, scope: str,
    limit: Optional[Tensor] = None,
) -> Tensor:
    """limit: optional int32 [B], blocks row b takes (<= num_blocks), decided on the device."""
    args = (query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, list(must_select), repre, scope)
    check.check_select(*args)
    _check_limit(limit, key_codes.shape[0])
    return kernels.dispatch("select_blocks", query.device.type, *args, limit=limit)


select_blocks_op = torch.library.custom_op("gsa::select_blocks", mutates_args=())(_select_blocks)


@select_blocks_op.register_fake
def _select_blocks_fake(query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope,
                        limit=None):
    check.check_select(query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope)
    _check_limit(limit, key_codes.shape[0])
    return key_codes.new_empty((key_codes.shape[0], key_codes.shape[1], num_blocks), dtype=torch.int32)


def _check_limit(limit: Optional[Tensor], batch: int) -> None:
    if limit is not None and (limit.dtype != torch.int32 or tuple(limit.shape) != (batch,)):
        raise check.GSAInputError(
            f"limit must be an int32 tensor of shape [{batch}] (blocks per batch row), got "
            f"{limit.dtype} {tuple(limit.shape)}"
        )


def _sparse_attention(
    query: Tensor, key: Tensor, value: Tensor, blocks: Tensor, valid: Optional[Tensor],
    attn_bias: Optional[Tensor], chunk_size: int, scale: Optional[float], softcap: Optional[float],
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """sinks: optional float [Hq], a sink logit per query head whose exp joins the softmax
    denominator (the keys' weights then sum to less than 1)."""
    check.check_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, sinks)
    return kernels.dispatch(
        "sparse_attention", query.device.type, query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap,
        sinks,
    ).contiguous()


sparse_attention_op = torch.library.custom_op("gsa::sparse_attention", mutates_args=())(_sparse_attention)


@sparse_attention_op.register_fake
def _sparse_attention_fake(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap, sinks=None):
    check.check_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, sinks)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def dense_attention(query, key, value, attn_mask, is_causal, scale, softcap) -> Tensor:
    """Exact attention over the whole cache, contiguous; a masked single-token decode on an
    accelerator goes through dense_decode_attention."""
    if query.shape[2] == 1 and attn_mask is not None and query.device.type != "cpu":
        return dense_decode_attention(query, key, value, attn_mask, scale, softcap)
    if softcap is not None:
        out = reference.dense_attention(query, key, value, attn_mask, is_causal, scale, softcap)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.contiguous()


def dense_decode_attention(query, key, value, attn_mask, scale, softcap) -> Tensor:
    """Exact masked decode attention through gsa::sparse_attention over every filled block:
    the G query heads of a KV head read its K/V once, where SDPA with enable_gqa and a mask
    falls back to its math kernel and materialises the repeated K/V. Plain torch around the op,
    so it traces into CUDA graphs."""
    plan = decode.plan_decode(query, key.shape[2], attn_mask, False, DENSE_DECODE_CHUNK, 0, 0)
    blocks = decode.every_filled_block(plan, key.shape[0], key.shape[1], query.device)
    return sparse_attention(query, key, value, blocks, plan.valid, plan.bias, DENSE_DECODE_CHUNK, scale, softcap)


# Block size of dense decodes through the sparse kernel (any size is exact; 128 keeps its tiles full).
DENSE_DECODE_CHUNK = 128


def _attention(
    query: Tensor, key: Tensor, value: Tensor, key_codes: Tensor, weight: Tensor,
    attn_mask: Optional[Tensor], key_norms: Optional[Tensor], reuse_blocks: Optional[Tensor],
    is_causal: bool, scale: Optional[float], softcap: Optional[float], chunk_size: int,
    top_k_ratio: Optional[float], budget_tokens: Optional[int], must_select: Sequence[int],
    repre: str, scope: str, seq_len_threshold: int, concurrency_threshold: int,
) -> tuple[Tensor, Tensor]:
    """One attention site. Returns (out, blocks): blocks is int32 [B, Hkv, ceil(L / C)], the
    selection ascending then -1, or every block (0..n-1) when the call ran dense."""
    check.check_attention_site(
        query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale, softcap,
        chunk_size, top_k_ratio, budget_tokens, must_select, repre, scope, seq_len_threshold, concurrency_threshold,
    )
    batch, kv_heads, num_keys = key.shape[0], key.shape[1], key.shape[2]
    plan = decode.plan_decode(query, num_keys, attn_mask, is_causal, chunk_size, seq_len_threshold, concurrency_threshold)
    if plan.dense not in (None, "device"):
        out = dense_attention(query, key, value, attn_mask, is_causal, scale, softcap)
        every_block = torch.arange(plan.n_blocks, dtype=torch.int32, device=query.device)
        return out, every_block.expand(batch, kv_heads, plan.n_blocks).contiguous()
    blocks = select_or_reuse(plan, query, key_codes, weight, key_norms, reuse_blocks, chunk_size, top_k_ratio,
                             budget_tokens, must_select, repre, scope)
    out = sparse_attention(query, key, value, blocks, plan.valid, plan.bias, chunk_size, scale, softcap)
    return out, torch.nn.functional.pad(blocks, (0, plan.n_blocks - blocks.shape[-1]), value=-1)


attention_op = torch.library.custom_op("gsa::attention", mutates_args=())(_attention)


def select_or_reuse(plan: decode.DecodePlan, query, key_codes, weight, key_norms, reuse_blocks, chunk_size,
                    top_k_ratio, budget_tokens, must_select, repre, scope) -> Tensor:
    """The blocks a sparse (or device-decided) call attends: its own selection, or the reused
    one cut to this call's budget."""
    num_blocks = plan.num_blocks(top_k_ratio, budget_tokens, must_select)
    limit = plan.limit(top_k_ratio, budget_tokens, must_select)
    if reuse_blocks is not None:
        return decode.truncate(reuse_blocks, num_blocks, limit)
    return select_blocks(query, key_codes, weight, plan.valid, key_norms, chunk_size, num_blocks,
                         list(must_select), repre, scope, limit)


@attention_op.register_fake
def _attention_fake(query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale,
                    softcap, chunk_size, top_k_ratio, budget_tokens, must_select, repre, scope,
                    seq_len_threshold, concurrency_threshold):
    check.check_attention_site(
        query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale, softcap,
        chunk_size, top_k_ratio, budget_tokens, must_select, repre, scope, seq_len_threshold, concurrency_threshold,
    )
    n_blocks = (key.shape[2] + chunk_size - 1) // chunk_size
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    return out, key.new_empty((key.shape[0], key.shape[1], n_blocks), dtype=torch.int32)


@torch.library.custom_op("gsa::no_backward", mutates_args=())
def no_backward(grad: Tensor, size: Sequence[int], op_name: str) -> Tensor:
    """What the backward of a gsa op computes: an error, raised when the backward runs (a
    compiled graph traces it through the fake implementation and raises only if it is used)."""
    raise GSAError(
        f"{op_name} has no backward: GSA ops are inference-only (decode with a KV cache); run training or "
        f"fine-tuning on the original model, or wrap inference in torch.no_grad()"
    )


@no_backward.register_fake
def _no_backward_fake(grad, size, op_name):
    return grad.new_empty(size)


def _refuse_backward(op_name: str):
    def backward(ctx, *grads):
        flowing = [g for g in grads if g is not None]
        if not flowing:  # nothing reaches this op's inputs
            return tuple(None for _ in ctx.sizes)
        return tuple(None if size is None else no_backward(flowing[0], size, op_name) for size in ctx.sizes)

    return backward


def _input_sizes(ctx, inputs, output):
    ctx.sizes = [list(t.shape) if isinstance(t, Tensor) and t.is_floating_point() else None for t in inputs]


for _op, _name in ((select_blocks_op, "gsa::select_blocks"), (sparse_attention_op, "gsa::sparse_attention"),
                   (attention_op, "gsa::attention")):
    _op.register_autograd(_refuse_backward(_name), setup_context=_input_sizes)


def _plain_eager(args, kwargs) -> bool:
    """Whether a call can skip the dispatcher: nothing traces it (no compile, no dispatch mode,
    plain tensors, not fake or subclassed) and autograd has nothing to record."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and (type(value) is not Tensor or (grad and value.requires_grad)):
            return False
    return True


def _eager_or_op(impl, op):
    """The op as callers use it. A plain eager call runs `impl` directly: the dispatcher's
    Python layers cost about as much host time as one decode kernel launch, and add nothing
    there; anything traced, fake or needing autograd goes through the op."""

    def call(*args, **kwargs):
        return impl(*args, **kwargs) if _plain_eager(args, kwargs) else op(*args, **kwargs)

    call.__name__ = call.__qualname__ = impl.__name__.lstrip("_")
    call.__doc__ = impl.__doc__
    return call


encode = _eager_or_op(_encode, encode_op)
select_blocks = _eager_or_op(_select_blocks, select_blocks_op)
sparse_attention = _eager_or_op(_sparse_attention, sparse_attention_op)
attention = _eager_or_op(_attention, attention_op)
