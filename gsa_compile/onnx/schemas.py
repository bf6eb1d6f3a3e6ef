"""The `gsa` ONNX domain (opset version 1): one schema per op, the single source of truth for
the exporter (onnxscript resolves `gsa.<Op>` through these), the checker and docs/onnx.md.

Every tensor input is required: where the PyTorch op had None, the exporter passes the
neutral value the schema names (an all-zero mask, ones for key norms), so each op has one
fixed signature that a runtime kernel and the model-local reference function both implement."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx.defs import OpSchema

DOMAIN = "gsa"
OPSET_VERSION = 1

FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
_INT, _INTS, _FLOAT, _STRING, _TENSOR = (
    OpSchema.AttrType.INT, OpSchema.AttrType.INTS, OpSchema.AttrType.FLOAT, OpSchema.AttrType.STRING,
    OpSchema.AttrType.TENSOR,
)


@dataclass(frozen=True)
class Param:
    name: str
    type_str: str
    doc: str


@dataclass(frozen=True)
class Attr:
    name: str
    kind: OpSchema.AttrType
    doc: str


@dataclass(frozen=True)
class OpSpec:
    name: str
    doc: str
    inputs: tuple
    outputs: tuple
    attributes: tuple

    def schema(self) -> OpSchema:
        return OpSchema(
            self.name, DOMAIN, OPSET_VERSION, self.doc,
            inputs=[OpSchema.FormalParameter(p.name, p.type_str, p.doc) for p in self.inputs],
            outputs=[OpSchema.FormalParameter(p.name, p.type_str, p.doc) for p in self.outputs],
            type_constraints=[("T", FLOAT_TYPES, "query/key/value/mask dtype")]
            if any(p.type_str == "T" for p in (*self.inputs, *self.outputs)) else [],
            attributes=[OpSchema.Attribute(a.name, a.kind, a.doc) for a in self.attributes],
        )


# ------------------------------------------------------------------ shared parameter texts
QUERY = Param("query", "T", "[B, Hq, T, D]; query head i belongs to KV head i // (Hq / Hkv)")
DECODE_QUERY = Param("query", "T", "[B, Hq, 1, D]: one query token per row")
KEY = Param("key", "T", "[B, Hkv, L, D]: the whole KV cache of the layer")
VALUE = Param("value", "T", "[B, Hkv, L, Dv]")
KEY_CODES = Param("key_codes", "tensor(uint8)", "[B, Hkv, L, R/8]: gsa.Encode(key, weight), kept beside the cache")
WEIGHT = Param("weight", "tensor(float)", "[Hkv, D, R]: the layer's hash projection")
ATTN_MASK = Param(
    "attn_mask", "T",
    "additive mask broadcastable to [B, Hq, T, L]; -inf marks a masked key. No mask: a [1, 1, 1, 1] zero",
)
KEY_NORMS = Param(
    "key_norms", "tensor(float)",
    "[B, Hkv, L] key L2 norms multiplying token scores, or a [1, 1, 1] one for unweighted scores",
)
VALID = Param("valid", "tensor(bool)", "broadcastable to [B, L]: False marks a masked/padding key. None: [1, 1] True")
BLOCKS_IN = Param("blocks", "tensor(int32)", "[B, Hkv, k]: selected block indices, -1 entries are ignored")
OUT = Param("out", "T", "[B, Hq, T, Dv]: attention output, the query's dtype")

CHUNK = Attr("chunk_size", _INT, "C: tokens per block; block c holds keys [c*C, (c+1)*C)")
MUST = Attr(
    "must_select", _INTS,
    "blocks always kept (>= 0 from the start, < 0 from the end); outside the cache or without a "
    "valid token: skipped; duplicates count once; they count inside the budget",
)
REPRE = Attr("repre", _STRING, "block score from its valid tokens' scores: 'max', 'min' or 'sum' (mean)")
SCOPE = Attr("scope", _STRING, "'per_head': a selection per (row, KV head); 'shared': block scores max-reduced over KV heads")
SCALE = Attr("scale", _FLOAT, "softmax scale (the exporter writes D**-0.5 when the model gave none)")
SOFTCAP = Attr("softcap", _FLOAT, "logits <- softcap * tanh(logits / softcap) before the mask; 0 = no softcap")
RATIO = Attr(
    "top_k_ratio", _TENSOR,
    "0-d double tensor: k = ceil(ratio * n_blocks) (the product rounded to 9 decimals first); "
    "ignored when budget_tokens > 0",
)
BUDGET = Attr("budget_tokens", _INT, "> 0: k = ceil(budget_tokens / C); 0: use top_k_ratio")
CAUSAL = Attr("is_causal", _INT, "1: SDPA's is_causal (top-left aligned) on top of attn_mask")
SEQ_THR = Attr("seq_len_threshold", _INT, "fewer keys than this: the call runs dense")
CONC_THR = Attr(
    "concurrency_threshold", _INT,
    "fewer batch rows than this with at least seq_len_threshold valid keys: the call runs dense (0 = off)",
)
BUDGET_ATTRS = (CHUNK, RATIO, BUDGET, MUST)
CALL_ATTRS = (SCALE, SOFTCAP, CAUSAL, SEQ_THR, CONC_THR)

ENCODE = OpSpec(
    "Encode",
    "Hash codes: bits = (x @ weight[h // G]) >= 0 computed in float32, packed little-endian "
    "(bit i of byte b is projected dim 8b + i).",
    inputs=(Param("x", "T", "[B, H, L, D], H a multiple of Hkv"), WEIGHT),
    outputs=(Param("codes", "tensor(uint8)", "[B, H, L, R/8]"),),
    attributes=(),
)

SELECT_BLOCKS = OpSpec(
    "SelectBlocks",
    "Top-k blocks per (row, KV head) for one decode query: token score = sum over the group's "
    "query heads of R - 2 * hamming(code(q_i), code(k_j)) (times key_norms); block score by "
    "repre over valid tokens; must_select first, then the best others, ties to the lower index.",
    inputs=(DECODE_QUERY, KEY_CODES, WEIGHT, VALID, KEY_NORMS),
    outputs=(Param("blocks", "tensor(int32)", "[B, Hkv, num_blocks]: ascending, -1 padded at the end"),),
    attributes=(CHUNK, Attr("num_blocks", _INT, "k, the number of blocks to select"), MUST, REPRE, SCOPE),
)

SELECT_TOP_BLOCKS = OpSpec(
    "SelectTopBlocks",
    "The selection kernel every other selecting op calls (Attention before its dense-fallback "
    "branch, SelectBlocks): SelectBlocks' scoring and order with the budget k and the "
    "must-select list as tensors, so one kernel serves budgets that depend on the cache length.",
    inputs=(
        Param("query", "tensor(float)", "[B, Hq, 1, D]: one query token per row, float32"),
        KEY_CODES, WEIGHT,
        Param("valid", "tensor(bool)", "[B, L]: False marks a masked/padding key"),
        KEY_NORMS,
        Param("k", "tensor(int64)", "[1]: blocks to select, 0 < k <= ceil(L / C)"),
        Param("must_select", "tensor(int64)", "[m]: blocks always kept (>= 0 from the start, < 0 from the end)"),
    ),
    outputs=(Param("blocks", "tensor(int32)", "[B, Hkv, k]: ascending, -1 padded at the end"),),
    attributes=(CHUNK, REPRE, SCOPE),
)

SPARSE_ATTENTION = OpSpec(
    "SparseAttention",
    "Exact softmax attention of each query head over the valid tokens of its KV head's selected "
    "blocks; a head with no such token outputs zeros.",
    inputs=(
        DECODE_QUERY, KEY, VALUE, BLOCKS_IN, VALID,
        Param("attn_bias", "T", "additive, broadcastable to [B, Hq, 1, L]; None: a [1, 1, 1, 1] zero"),
    ),
    outputs=(Param("out", "T", "[B, Hq, 1, Dv]"),),
    attributes=(CHUNK, SCALE, SOFTCAP),
)

SITE_OUTPUTS = (
    OUT,
    Param(
        "blocks", "tensor(int32)",
        "[B, Hkv, ceil(L / C)]: the selection ascending then -1, or 0..n-1 when the call ran dense",
    ),
)

ATTENTION = OpSpec(
    "Attention",
    "One attention site (docs/semantics.md). Runs dense (exact SDPA with attn_mask and is_causal) "
    "when T > 1, or is_causal with L > 1, or L < seq_len_threshold, or fewer than "
    "concurrency_threshold rows reach seq_len_threshold valid keys. Otherwise selects "
    "k = clamp(budget, #must_select, n_blocks) blocks (SelectBlocks, valid = keys the last mask "
    "row lets through for some head) and attends them (SparseAttention with the mask as bias).",
    inputs=(QUERY, KEY, VALUE, KEY_CODES, WEIGHT, ATTN_MASK, KEY_NORMS),
    outputs=SITE_OUTPUTS,
    attributes=BUDGET_ATTRS + (REPRE, SCOPE) + CALL_ATTRS,
)

REUSE_ATTENTION = OpSpec(
    "ReuseAttention",
    "Attention with another layer's selection (top_k_index_reuse): the same dense-fallback rules "
    "as Attention, then SparseAttention over the first k entries of reuse_blocks.",
    inputs=(
        QUERY, KEY, VALUE, ATTN_MASK,
        Param("reuse_blocks", "tensor(int32)", "[B, Hkv, >= k]: the source layer's Attention blocks output"),
    ),
    outputs=SITE_OUTPUTS,
    attributes=BUDGET_ATTRS + CALL_ATTRS,
)

OP_SPECS = {spec.name: spec for spec in (ENCODE, SELECT_BLOCKS, SELECT_TOP_BLOCKS, SPARSE_ATTENTION, ATTENTION, REUSE_ATTENTION)}


def register_schemas() -> None:
    """Make the gsa domain known to onnx (and so to onnxscript and the checker); idempotent."""
    # onnx.reference indexes every registered schema by op name once, when first imported, and
    # refuses two domains sharing one (ai.onnx has an Attention too): let it index before ours.
    import onnx.reference  # noqa: F401
    for spec in OP_SPECS.values():
        if not onnx.defs.has(spec.name, DOMAIN):
            onnx.defs.register_schema(spec.schema())
