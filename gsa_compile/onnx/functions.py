"""Model-local ONNX functions (FunctionProto) for every gsa op: the reference implementation of
the op in standard ops, with the op's own domain, name, inputs and attributes. Stock
onnxruntime inlines them; a runtime with a kernel registered for gsa.<Op> runs that instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
from onnx import AttributeProto as A

from . import steps
from .builder import BOOL, FLOAT, Emitter, make_function
from .schemas import (
    ATTENTION,
    DOMAIN,
    ENCODE,
    OPSET_VERSION,
    REUSE_ATTENTION,
    SELECT_BLOCKS,
    SELECT_TOP_BLOCKS,
    SPARSE_ATTENTION,
    OpSpec,
)

# The attributes of the calling node a SelectTopBlocks call inside another body forwards.
_SELECTION_ATTRS = (("chunk_size", A.INT), ("repre", A.STRING), ("scope", A.STRING))
# ... and a SparseAttention call.
_ATTENTION_ATTRS = (("chunk_size", A.INT), ("scale", A.FLOAT), ("softcap", A.FLOAT))


class _Attrs:
    """The calling node's attributes as tensors, read once at the top of a function body
    (If branches use these values; they never reference attributes themselves)."""

    def __init__(self, e: Emitter):
        self._e = e

    def chunk(self) -> str:
        return self._e.reshape(self._e.attr("chunk_size", A.INT), self._e.ints(1))

    def int(self, name: str) -> str:
        return self._e.attr(name, A.INT)

    def flag(self, name: str) -> str:
        return self._e.cast(self._e.attr(name, A.INT), BOOL)

    def float(self, name: str) -> str:
        return self._e.attr(name, A.FLOAT)

    def string(self, name: str) -> str:
        return self._e.attr(name, A.STRING)

    def ints(self, name: str) -> str:
        return self._e.attr(name, A.INTS)

    def tensor(self, name: str) -> str:
        return self._e.attr(name, A.TENSOR)


def _encode(e: Emitter) -> list[str]:
    return [steps.encode(e, "x", "weight")]


def _select_blocks(e: Emitter) -> list[str]:
    attrs = _Attrs(e)
    wanted = e.reshape(attrs.int("num_blocks"), e.ints(1))
    num_keys = e.dims("key_codes", 2, 3)
    n_blocks = steps.num_blocks(e, num_keys, attrs.chunk())
    valid = e.op("Expand", "valid", e.cat(e.dims("query", 0, 1), num_keys))
    k = e.op("Min", wanted, n_blocks)
    blocks = _call_select(e, e.cast("query", FLOAT), valid, k, attrs.ints("must_select"))
    return [steps.pad_blocks(e, blocks, wanted)]


def _select_top_blocks(e: Emitter) -> list[str]:
    attrs = _Attrs(e)
    chunk, repre, scope = attrs.chunk(), attrs.string("repre"), attrs.string("scope")
    n_blocks = steps.num_blocks(e, e.dims("key_codes", 2, 3), chunk)
    similarity = steps.token_similarity(e, "query", "key_codes", "weight", "key_norms")
    scores = steps.block_scores(e, similarity, "valid", chunk, n_blocks, repre, scope)
    return [steps.top_blocks(e, scores, steps.must_select_mask(e, "must_select", n_blocks), "k", n_blocks)]


def _call_select(e: Emitter, query: str, valid: str, k: str, must_select: str) -> str:
    """gsa.SelectTopBlocks on the calling node's codes, weight and key norms."""
    return e.call(DOMAIN, SELECT_TOP_BLOCKS.name, query, "key_codes", "weight", valid, "key_norms", k, must_select,
                  forwarded=_SELECTION_ATTRS)


def _sparse_attention(e: Emitter) -> list[str]:
    attrs = _Attrs(e)
    chunk, scale, softcap = attrs.chunk(), attrs.float("scale"), attrs.float("softcap")
    return [steps.sparse_attention(e, "query", "key", "value", "blocks", "valid", "attn_bias", chunk, scale, softcap)]


@dataclass
class _Site:
    """Values of an attention site that a selection rule needs."""

    valid: str
    query: str
    must_select: str
    k: str


def _site(e: Emitter, select: Callable) -> list[str]:
    """The body shared by Attention and ReuseAttention: mask -> valid keys, budget, the selection
    select(e, site) -> blocks, then the dense-fallback If whose sparse branch attends the blocks.

    The selection and the attention over the selected blocks are made outside the If, on the
    last query token, even for a call that runs dense: they cost a pass over the codes and a
    read of k blocks, little beside dense attention, and keep the kernels (gsa.SelectTopBlocks,
    gsa.SparseAttention) nodes of the body itself, where a runtime's registered kernels replace
    them; nodes inside If branches cannot read the calling node's attributes."""
    attrs = _Attrs(e)
    chunk, scale, softcap = attrs.chunk(), attrs.float("scale"), attrs.float("softcap")
    is_causal, must_select = attrs.flag("is_causal"), attrs.ints("must_select")
    ratio, budget_tokens = attrs.tensor("top_k_ratio"), attrs.int("budget_tokens")
    thresholds = attrs.int("seq_len_threshold"), attrs.int("concurrency_threshold")
    num_keys = e.dims("key", 2, 3)
    n_blocks = steps.num_blocks(e, num_keys, chunk)
    valid = steps.valid_keys(e, "attn_mask", "query", num_keys)
    dense = steps.runs_dense(e, "query", num_keys, valid, is_causal, *thresholds)
    must = steps.must_select_mask(e, must_select, n_blocks)
    # The last token: a dense call may have several; static-shape inference (onnxruntime checks
    # both branches when it loads a model) then sees a one-token query in the sparse branch.
    site = _Site(valid, steps.last_token(e, "query"), must_select,
                 steps.budget(e, n_blocks, chunk, ratio, budget_tokens, must))
    blocks = select(e, site)

    dense_branch = e.branch()
    dense_out = steps.dense_attention(dense_branch, "query", "key", "value", "attn_mask", is_causal, scale, softcap)
    dense_blocks = steps.every_block(dense_branch, "key", n_blocks)

    # The mask row of the last query token as given: SparseAttention broadcasts it.
    sparse_out = e.call(DOMAIN, SPARSE_ATTENTION.name, site.query, "key", "value", blocks, valid,
                        steps.last_token(e, "attn_mask"), forwarded=_ATTENTION_ATTRS)
    sparse_branch = e.branch()
    sparse_blocks = steps.pad_blocks(sparse_branch, blocks, n_blocks)

    return e.op(
        "If", dense, outputs=2,
        then_branch=dense_branch.graph("dense", [dense_out, dense_blocks]),
        else_branch=sparse_branch.graph("sparse", [sparse_branch.op("Identity", sparse_out), sparse_blocks]),
    )


def _attention(e: Emitter) -> list[str]:
    return _site(e, lambda e, site: _call_select(e, e.cast(site.query, FLOAT), site.valid, site.k, site.must_select))


def _reuse_attention(e: Emitter) -> list[str]:
    return _site(e, lambda e, site: e.op("Slice", "reuse_blocks", e.ints(0), site.k, e.ints(2)))


_BODIES = {
    ENCODE.name: _encode,
    SELECT_BLOCKS.name: _select_blocks,
    SELECT_TOP_BLOCKS.name: _select_top_blocks,
    SPARSE_ATTENTION.name: _sparse_attention,
    ATTENTION.name: _attention,
    REUSE_ATTENTION.name: _reuse_attention,
}


def build_function(spec: OpSpec) -> onnx.FunctionProto:
    e = Emitter(spec.name.lower())
    results = _BODIES[spec.name](e)
    outputs = [p.name for p in spec.outputs]
    for result, name in zip(results, outputs):
        e.nodes.append(onnx.helper.make_node("Identity", [result], [name]))
    return make_function(
        spec.name, DOMAIN, [p.name for p in spec.inputs], outputs, [a.name for a in spec.attributes], e, spec.doc
    )
