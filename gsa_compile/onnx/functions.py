"""Model-local ONNX functions (FunctionProto) for every gsa op: the reference implementation of
the op in standard ops, with the op's own domain, name, inputs and attributes. Stock
onnxruntime inlines them; a runtime with a kernel registered for gsa.<Op> runs that instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx
from onnx import AttributeProto as A

from . import steps
from .builder import BOOL, Emitter, make_function
from .schemas import ATTENTION, DOMAIN, ENCODE, REUSE_ATTENTION, SELECT_BLOCKS, SPARSE_ATTENTION, OpSpec


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
    chunk, must_select = attrs.chunk(), attrs.ints("must_select")
    wanted = e.reshape(attrs.int("num_blocks"), e.ints(1))
    repre, scope = attrs.string("repre"), attrs.string("scope")
    num_keys = e.dims("key_codes", 2, 3)
    n_blocks = steps.num_blocks(e, num_keys, chunk)
    valid = e.op("Expand", "valid", e.cat(e.dims("query", 0, 1), num_keys))
    similarity = steps.token_similarity(e, "query", "key_codes", "weight", "key_norms")
    scores = steps.block_scores(e, similarity, valid, chunk, n_blocks, repre, scope)
    k = e.op("Min", wanted, n_blocks)
    blocks = steps.top_blocks(e, scores, steps.must_select_mask(e, must_select, n_blocks), k, n_blocks)
    return [steps.pad_blocks(e, blocks, wanted)]


def _sparse_attention(e: Emitter) -> list[str]:
    attrs = _Attrs(e)
    chunk, scale, softcap = attrs.chunk(), attrs.float("scale"), attrs.float("softcap")
    return [steps.sparse_attention(e, "query", "key", "value", "blocks", "valid", "attn_bias", chunk, scale, softcap)]


@dataclass
class _Site:
    """Values of an attention site that a selection rule needs, all computed outside its branch."""

    chunk: str
    n_blocks: str
    valid: str
    query: str = ""
    must: str = ""
    k: str = ""
    extra: dict = field(default_factory=dict)


def _site(e: Emitter, select: Callable, read_extra: Callable = lambda attrs: {}) -> list[str]:
    """The body shared by Attention and ReuseAttention: mask -> valid keys, the dense-fallback
    If, and in the sparse branch select(branch, site) -> blocks, then sparse attention."""
    attrs = _Attrs(e)
    chunk, scale, softcap = attrs.chunk(), attrs.float("scale"), attrs.float("softcap")
    is_causal, must_select = attrs.flag("is_causal"), attrs.ints("must_select")
    ratio, budget_tokens = attrs.tensor("top_k_ratio"), attrs.int("budget_tokens")
    thresholds = attrs.int("seq_len_threshold"), attrs.int("concurrency_threshold")
    num_keys = e.dims("key", 2, 3)
    n_blocks = steps.num_blocks(e, num_keys, chunk)
    bias = steps.last_row_bias(e, "attn_mask", "query", num_keys)
    site = _Site(chunk, n_blocks, steps.valid_keys(e, bias), extra=read_extra(attrs))
    dense = steps.runs_dense(e, "query", num_keys, site.valid, is_causal, *thresholds)

    dense_branch = e.branch()
    dense_out = steps.dense_attention(dense_branch, "query", "key", "value", "attn_mask", is_causal, scale, softcap)
    dense_blocks = steps.every_block(dense_branch, "key", n_blocks)

    sparse_branch = e.branch()
    # The branch runs only when T == 1; slicing the last token lets static-shape inference
    # (onnxruntime checks both branches when it loads a model) see a one-token query.
    site.query = steps.last_token(sparse_branch, "query")
    site.must = steps.must_select_mask(sparse_branch, must_select, n_blocks)
    site.k = steps.budget(sparse_branch, n_blocks, chunk, ratio, budget_tokens, site.must)
    blocks = select(sparse_branch, site)
    sparse_out = steps.sparse_attention(
        sparse_branch, site.query, "key", "value", blocks, site.valid, bias, chunk, scale, softcap
    )
    sparse_blocks = steps.pad_blocks(sparse_branch, blocks, n_blocks)

    return e.op(
        "If", dense, outputs=2,
        then_branch=dense_branch.graph("dense", [dense_out, dense_blocks]),
        else_branch=sparse_branch.graph("sparse", [sparse_out, sparse_blocks]),
    )


def _select_by_scores(e: Emitter, site: _Site) -> str:
    similarity = steps.token_similarity(e, site.query, "key_codes", "weight", "key_norms")
    scores = steps.block_scores(e, similarity, site.valid, site.chunk, site.n_blocks, **site.extra)
    return steps.top_blocks(e, scores, site.must, site.k, site.n_blocks)


def _attention(e: Emitter) -> list[str]:
    return _site(e, _select_by_scores, lambda attrs: {"repre": attrs.string("repre"), "scope": attrs.string("scope")})


def _reuse_attention(e: Emitter) -> list[str]:
    return _site(e, lambda branch, site: branch.op("Slice", "reuse_blocks", branch.ints(0), site.k, branch.ints(2)))


_BODIES = {
    ENCODE.name: _encode,
    SELECT_BLOCKS.name: _select_blocks,
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
