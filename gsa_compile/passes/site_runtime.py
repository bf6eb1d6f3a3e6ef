"""The call a rewritten graph makes at each GSA site.

`gsa_site` brings the matched tensors to the op contract's BHSD layout, runs gsa::attention
with the keys' codes (from the codes state, or encoded now when no cache feeds the keys) and
returns (out in the site's layout, blocks). It is plain torch code,
so Inductor, AOT autograd and torch.export trace through it; only the gsa ops stay opaque."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import functional, ops


def gsa_site(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], weight: Tensor,
    key_codes: Optional[Tensor], key_norms: Optional[Tensor], reuse_blocks: Optional[Tensor],
    scale_input=None, scale_divides: bool = False, *,
    key_norm_weighting: bool, invert_mask: bool, is_causal: bool, scale: Optional[float], softcap: Optional[float],
    query_permute: Optional[Sequence[int]] = None, key_permute: Optional[Sequence[int]] = None,
    value_permute: Optional[Sequence[int]] = None, output_permute: Optional[Sequence[int]] = None,
    key_transposed: bool = False, finite_fill: bool = False, chunk_size: int, top_k_ratio: Optional[float], budget_tokens: Optional[int],
    must_select: Sequence[int], repre: str, scope: str, seq_len_threshold: int, concurrency_threshold: int,
) -> tuple[Tensor, Tensor]:
    """key_codes (and key_norms) come from the codes state when a cache feeds the keys; None
    means no cache: the site encodes its keys now, or, when it reuses another layer's
    selection (reuse_blocks given), computes no codes at all. scale_input: a scale the graph
    computes (a tensor or number), folded into the query: multiplied, or divided by when
    scale_divides. finite_fill: the (bool) mask comes from a fill with a finite value, so a query
    row whose every key is masked gets eager's answer, the mean of V."""
    query = query if query_permute is None else query.permute(*query_permute)
    if scale_input is not None:
        query = query / scale_input if scale_divides else query * scale_input
    key = key if key_permute is None else key.permute(*key_permute)
    key = key.transpose(-2, -1) if key_transposed else key
    value = value if value_permute is None else value.permute(*value_permute)
    folded_heads = query.dim() == 3
    # Scores of folded heads weighting values [B, H, L, D]: the output is [B, H, T, D] too.
    unfolded_values = value.shape[:2] if folded_heads and value.dim() == 4 else None
    if unfolded_values is not None:
        value = value.flatten(0, 1)
    if folded_heads:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if attn_mask is not None:
        if invert_mask:
            attn_mask = attn_mask.logical_not()
        if folded_heads and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        if finite_fill:
            # Such a row has one score everywhere (the fill): softmax is uniform over all keys. A
            # zero query attending every key gives the same; other rows are untouched.
            empty = attn_mask.logical_not().all(-1, keepdim=True)
            attn_mask = attn_mask.logical_or(empty)
            query = query.masked_fill(empty, 0)
    if key_codes is None and reuse_blocks is not None:
        # Shape-only codes: gsa::attention reads the reused selection, never these.
        key_codes = key.new_zeros((), dtype=torch.uint8).expand(*key.shape[:3], weight.shape[-1] // 8)
    elif key_codes is None:
        key_codes = ops.encode(key, weight)
        key_norms = functional.key_norms(key) if key_norm_weighting else None
    out, blocks = ops.attention(
        query, key, value, key_codes, weight, attn_mask, key_norms, reuse_blocks, is_causal, scale, softcap,
        chunk_size, top_k_ratio, budget_tokens, list(must_select), repre, scope, seq_len_threshold,
        concurrency_threshold,
    )
    if folded_heads:
        out = out.squeeze(1)
    if unfolded_values is not None:
        out = out.unflatten(0, unfolded_values)
    if output_permute is not None:
        out = out.permute(*output_permute)
    return out, blocks


def gsa_mha_site(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], weight: Tensor,
    in_proj_weight: Optional[Tensor], in_proj_bias: Optional[Tensor],
    out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor], v_proj_weight: Optional[Tensor], key_padding_mask: Optional[Tensor],
    *, num_heads: int, **site_options,
) -> tuple[Tensor, Tensor]:
    """nn.MultiheadAttention's forward (sequence-first [T, B, E] inputs, need_weights=False)
    with GSA attention: in-projection, GSA over [B, H, T, E / H], out-projection."""
    import torch.nn.functional as F

    targets, batch, embed = query.shape
    sources = key.shape[0]
    if in_proj_weight is not None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    head_dim = embed // num_heads

    def heads(x: Tensor, w: Tensor, b: Optional[Tensor], length: int) -> Tensor:
        return F.linear(x, w, b).reshape(length, batch, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads(query, w_q, b_q, targets), heads(key, w_k, b_k, sources), heads(value, w_v, b_v, sources)
    mask = _mha_mask(attn_mask, key_padding_mask, batch, num_heads, targets, sources, q.dtype)
    out, blocks = gsa_site(q, k, v, mask, weight, None, None, None, **site_options)
    out = out.permute(2, 0, 1, 3).reshape(targets, batch, embed)
    return F.linear(out, out_proj_weight, out_proj_bias), blocks


def _mha_mask(attn_mask, key_padding_mask, batch, num_heads, targets, sources, dtype):
    """MultiheadAttention's masks (bool True = masked out, float = added) as one additive mask
    broadcastable to [B, H, T, S], or None."""
    mask = None
    if attn_mask is not None:
        mask = _as_additive(attn_mask, dtype)
        mask = mask.reshape(batch, num_heads, targets, sources) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype).reshape(batch, 1, 1, sources)
        mask = padding if mask is None else mask + padding
    return mask


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
