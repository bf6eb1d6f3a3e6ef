"""torch.ops.gsa.* -> gsa-domain ONNX nodes, for torch.onnx.export's custom_translation_table.

Each translation writes one gsa node whose attributes carry the op's Python arguments, and
fills the schema's neutral value where the PyTorch op had None (see schemas.py). Masks become
additive in the query's dtype with -inf for masked keys, decided in the mask's own dtype the
way the PyTorch op decides it (a bool False, or an additive value at or below half the
dtype's lowest), so the node's meaning does not depend on which dtype the model used."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset18 as op

from ..errors import GSAInputError
from ..passes import codes_state  # noqa: F401  (registers gsa::cached_codes_cat)
from .codes_io import PLACEHOLDER_DOMAIN, PLACEHOLDERS, register_placeholder_schemas
from .schemas import DOMAIN, OPSET_VERSION, register_schemas

register_schemas()
register_placeholder_schemas()
gsa = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)
placeholders = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)

_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64,
}


def _constant(array: np.ndarray):
    return op.Constant(value=ir.tensor(array))


def _like(array: np.ndarray, reference):
    return op.CastLike(_constant(array.astype(np.float32)), reference)


def _rank4(x):
    for _ in range(4 - len(x.shape)):
        x = op.Unsqueeze(x, _constant(np.array([0], dtype=np.int64)))
    return x


def _additive_mask(attn_mask, query):
    """rank-4 additive mask in the query's dtype, -inf where a key is masked; a zero when None."""
    if attn_mask is None:
        return _like(np.zeros((1, 1, 1, 1)), query)
    # Decide on the input's dtype: values made by the tracer (Unsqueeze below) carry none.
    dtype = attn_mask.dtype
    mask = _rank4(attn_mask)
    minus_inf = _like(np.array(-np.inf), query)
    if dtype == ir.DataType.BOOL:
        return op.Where(mask, _like(np.array(0.0), query), minus_inf)
    lowest = torch.finfo(_TORCH_DTYPES[dtype]).min / 2
    allowed = op.Greater(mask, op.CastLike(_constant(np.array(lowest, dtype=np.float64)), mask))
    return op.Where(allowed, op.CastLike(mask, query), minus_inf)


def _scale(scale, query) -> float:
    if scale is not None:
        return float(scale)
    head_dim = query.shape[-1]
    if not isinstance(head_dim, int):
        raise GSAInputError(
            f"exporting a gsa op with scale=None needs a static head dim to write D**-0.5, got {head_dim}; "
            f"pass scale explicitly"
        )
    return head_dim ** -0.5


def _site_attrs(query, is_causal, scale, softcap, chunk_size, top_k_ratio, budget_tokens, must_select,
                seq_len_threshold, concurrency_threshold) -> dict:
    return {
        "chunk_size": int(chunk_size),
        "top_k_ratio": ir.tensor(np.array(0.0 if top_k_ratio is None else top_k_ratio, dtype=np.float64)),
        "budget_tokens": 0 if budget_tokens is None else int(budget_tokens),
        "must_select": ir.AttrInt64s("must_select", [int(b) for b in must_select]),
        "scale": _scale(scale, query),
        "softcap": 0.0 if softcap is None else float(softcap),
        "is_causal": int(bool(is_causal)),
        "seq_len_threshold": int(seq_len_threshold),
        "concurrency_threshold": int(concurrency_threshold),
    }


def _ones_key_norms():
    return _constant(np.ones((1, 1, 1), dtype=np.float32))


def _all_valid():
    return _constant(np.ones((1, 1), dtype=np.bool_))


def translate_encode(x, weight):
    return gsa.Encode(x, weight)


def translate_select_blocks(query, key_codes, weight, valid, key_norms, chunk_size, num_blocks, must_select, repre, scope):
    return gsa.SelectBlocks(
        query, key_codes, weight, _all_valid() if valid is None else valid,
        _ones_key_norms() if key_norms is None else key_norms,
        chunk_size=int(chunk_size), num_blocks=int(num_blocks),
        must_select=ir.AttrInt64s("must_select", [int(b) for b in must_select]), repre=repre, scope=scope,
    )


def translate_sparse_attention(query, key, value, blocks, valid, attn_bias, chunk_size, scale, softcap, sinks=None):
    if sinks is not None:
        raise GSAInputError("gsa::sparse_attention with attention sinks has no ONNX translation (gsa.SparseAttention "
                             "takes no sinks); export the layer as the model's own attention")
    bias = _like(np.zeros((1, 1, 1, 1)), query) if attn_bias is None else op.CastLike(attn_bias, query)
    return gsa.SparseAttention(
        query, key, value, op.Cast(blocks, to=ir.DataType.INT32), _all_valid() if valid is None else valid, bias,
        chunk_size=int(chunk_size), scale=_scale(scale, query), softcap=0.0 if softcap is None else float(softcap),
    )


def translate_attention(
    query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale, softcap,
    chunk_size, top_k_ratio, budget_tokens, must_select, repre, scope, seq_len_threshold, concurrency_threshold,
):
    mask = _additive_mask(attn_mask, query)
    attrs = _site_attrs(query, is_causal, scale, softcap, chunk_size, top_k_ratio, budget_tokens, must_select,
                        seq_len_threshold, concurrency_threshold)
    if reuse_blocks is not None:
        return gsa.ReuseAttention(query, key, value, mask, op.Cast(reuse_blocks, to=ir.DataType.INT32), **attrs)
    norms = _ones_key_norms() if key_norms is None else key_norms
    return gsa.Attention(query, key, value, key_codes, weight, mask, norms, repre=repre, scope=scope, **attrs)


def translate_cached_codes_cat(past, new, weight, state_id, site, what):
    """A placeholder that codes_io.lift_codes_state turns into explicit past/present codes."""
    return getattr(placeholders, PLACEHOLDERS[what])(past, new, weight, site=int(site))


def translation_table() -> dict:
    """The custom_translation_table for torch.onnx.export."""
    return {
        torch.ops.gsa.encode.default: translate_encode,
        torch.ops.gsa.select_blocks.default: translate_select_blocks,
        torch.ops.gsa.sparse_attention.default: translate_sparse_attention,
        torch.ops.gsa.attention.default: translate_attention,
        torch.ops.gsa.cached_codes_cat.default: translate_cached_codes_cat,
    }
