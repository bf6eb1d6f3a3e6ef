"""EMULATION of the torch_npu operators the GSA NPU kernels call. It is not torch_npu and has
never been compared with Ascend hardware: it runs on CPU tensors and implements what the
documentation says (torch_npu API reference and Ascend/op-plugin docs/context/*.md), refusing
what the documentation says the real operator refuses, so that the NPU lowering can be tested in
CI. Tests install it as sys.modules["torch_npu"] (see conftest.py). Every call is first bound to
the operator's schema as torch-npu 2.13.0 declares it, so a kernel cannot pass an argument, or an
argument type, the real operator does not take.

- npu_sign_bits_pack(self, size): 1-D float16/float32 -> uint8 [size, ceil(n / 8) / size];
  documented equivalent np.packbits(np.bool_(np.sign(x) + 1), bitorder="little"), so a value
  >= 0 (and NaN) is bit 1; the input is padded with -1.0 up to a multiple of 8.
- npu_sign_bits_unpack(x, size, dtype): 1-D uint8 -> [size, 8n / size] of +-1.0 (bit 1 -> 1.0,
  bit 0 -> -1.0), little-endian, dtype float16 or float32.
- npu_fused_infer_attention_score: the one-query-token (IncreFlashAttention) branch with input
  layout BNSD, optional paged KV (block_table), atten_mask (True = masked) and pse_shift; the
  other features raise NotImplementedError. The documentation does not state rounding: this
  computes in float32 from the float16/bfloat16 inputs (high-precision mode) and rounds the
  output once to the query dtype. It also does not state whether pse_shift is added before or
  after the scale, so pse_shift with scale != 1 is refused here rather than guessed. A fully
  masked row yields NaN here; the real result is undocumented, so callers must not use it.
"""

from __future__ import annotations

import math
import types

import torch

# From torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml in the torch-npu 2.13.0 wheel.
SCHEMAS = {
    "npu_sign_bits_pack": "npu_sign_bits_pack(Tensor self, int size) -> Tensor",
    "npu_sign_bits_unpack": "npu_sign_bits_unpack(Tensor input, int size, ScalarType dtype) -> Tensor",
    "npu_fused_infer_attention_score": (
        "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
        "Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, "
        "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, "
        "Tensor? quant_scale2=None, Tensor? quant_offset2=None, Tensor? antiquant_scale=None, "
        "Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, "
        "Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None, Tensor? block_table=None, "
        "Tensor? query_padding_size=None, Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, "
        "Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, "
        "Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, "
        "int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout=\"BSH\", "
        "int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, "
        "int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0, "
        "bool softmax_lse_flag=False) -> (Tensor, Tensor)"
    ),
}
SCHEMA_TYPES = {
    "Tensor": lambda v: isinstance(v, torch.Tensor),
    "Tensor?": lambda v: v is None or isinstance(v, torch.Tensor),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ScalarType": lambda v: isinstance(v, torch.dtype),
    "SymInt[]?": lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(n, int) for n in v)),
}
FIA_DTYPES = (torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
_FIA_DEFAULTS = {"pre_tokens": 2147483647, "next_tokens": 2147483647, "sparse_mode": 0, "antiquant_mode": 0,
                 "key_antiquant_mode": 0, "value_antiquant_mode": 0, "actual_seq_lengths": None}


def build() -> types.ModuleType:
    """A fresh module standing in for torch_npu; `calls` records (op name, arguments) of every call."""
    module = types.ModuleType("torch_npu")
    module.__version__ = "emulation"
    module.calls = []

    def recorded(name, fn):
        def call(*args, **kwargs):
            bind_to_schema(name, args, kwargs)
            module.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return call

    module.npu_sign_bits_pack = recorded("npu_sign_bits_pack", npu_sign_bits_pack)
    module.npu_sign_bits_unpack = recorded("npu_sign_bits_unpack", npu_sign_bits_unpack)
    module.npu_fused_infer_attention_score = recorded(
        "npu_fused_infer_attention_score", npu_fused_infer_attention_score)
    return module


def bind_to_schema(name: str, args: tuple, kwargs: dict) -> None:
    """Raise TypeError unless (args, kwargs) is a valid call of the operator's declared schema."""
    text = SCHEMAS[name]
    params, keyword_only = [], False
    for item in text[text.index("(") + 1:text.index(") ->")].split(", "):
        if item == "*":
            keyword_only = True
            continue
        declared, _, default = item.partition("=")
        type_name, param = declared.rsplit(" ", 1)
        params.append((param, type_name, bool(default), keyword_only))
    positional = [p for p in params if not p[3]]
    if len(args) > len(positional):
        raise TypeError(f"{name} takes {len(positional)} positional arguments, got {len(args)}")
    given = dict(zip((p[0] for p in positional), args))
    for key, value in kwargs.items():
        if key in given or key not in {p[0] for p in params}:
            raise TypeError(f"{name}: unexpected or repeated argument {key!r}")
        given[key] = value
    for param, type_name, has_default, _ in params:
        if param not in given:
            if not has_default:
                raise TypeError(f"{name}: missing argument {param!r}")
        elif not SCHEMA_TYPES[type_name](given[param]):
            raise TypeError(f"{name}: {param} must be {type_name}, got {type(given[param]).__name__}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"torch_npu emulation: {message}")


def npu_sign_bits_pack(self: torch.Tensor, size: int) -> torch.Tensor:
    _require(self.dim() == 1, "input must be one-dimensional")
    _require(self.dtype in (torch.float16, torch.float32), "all only supports torch.float16 and torch.float32 dtypes")
    out_bytes = (self.numel() + 7) // 8
    _require(size != 0 and out_bytes % size == 0, "all must be divisible by size")
    padded = torch.cat([self, self.new_full((8 * out_bytes - self.numel(),), -1.0)])
    bits = (torch.sign(padded) + 1) != 0
    weights = 2 ** torch.arange(8, dtype=torch.int32)
    packed = (bits.view(out_bytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return packed.view(size, out_bytes // size)


def npu_sign_bits_unpack(x: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    _require(x.dim() == 1, "input must be one-dimensional")
    _require(x.dtype == torch.uint8, "input must be uint8")
    _require(dtype in (torch.float16, torch.float32), "dtype must be torch.float16 or torch.float32")
    values = x.numel() * 8
    _require(size != 0 and values % size == 0, "the unpacked size must be divisible by size")
    bits = (x.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return ((bits.to(torch.float32) - 0.5) * 2.0).to(dtype).view(size, values // size)


def npu_fused_infer_attention_score(
    query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths_kv=None, block_table=None,
    num_heads=1, scale=1.0, input_layout="BSH", num_key_value_heads=0, inner_precise=0, block_size=0,
    softmax_lse_flag=False, **others,
):
    unsupported = {k: v for k, v in others.items() if v is not None and _FIA_DEFAULTS.get(k, None) != v}
    if unsupported or input_layout != "BNSD" or query.dim() != 4 or query.shape[2] != 1:
        raise NotImplementedError(
            f"the emulation covers the BNSD one-query-token branch without quantisation, prefixes or padding; "
            f"got input_layout={input_layout!r}, query {tuple(query.shape)}, extra arguments {sorted(unsupported)}")
    batch, heads, _, dim = query.shape
    _require(query.dtype in FIA_DTYPES, f"query must be float16 or bfloat16, got {query.dtype}")
    _require(key.dtype == value.dtype == query.dtype, "key and value must have the query's dtype")
    _require(query.is_contiguous() and key.is_contiguous() and value.is_contiguous(),
             "query, key and value must be contiguous")
    _require(key.shape == value.shape, "key and value must have the same shape")
    _require(num_heads == heads, f"num_heads={num_heads} must equal query's N={heads} in BNSD")
    kv_heads = num_key_value_heads or num_heads
    _require(heads % kv_heads == 0 and heads // kv_heads <= 64,
             "num_heads must be a multiple of num_key_value_heads, at most 64 times it")
    _require(inner_precise in (0, 1), "inner_precise must be 0 or 1 with one query token")
    _require(batch <= 65536 and heads <= 256 and dim <= 512, "B <= 65536, N <= 256, D <= 512")
    if block_table is None:
        _require(key.dim() == 4 and key.shape[0] == batch and key.shape[1] == kv_heads and key.shape[3] == dim,
                 f"BNSD key must be [B, num_key_value_heads, S, D], got {tuple(key.shape)}")
        caches = [(key[b], value[b]) for b in range(batch)]
        lengths = _lengths(actual_seq_lengths_kv, batch, key.shape[2])
        width = key.shape[2]
    else:
        caches, lengths, width = _paged(
            key, value, block_table, actual_seq_lengths_kv, block_size, batch, kv_heads, dim)
    _require(max(lengths) <= 262144, "the KV sequence is at most 262144 tokens with one query token")
    masked = _mask(atten_mask, batch, width)
    bias = _pse(pse_shift, query, heads, width, scale)
    out = torch.empty(batch, heads, 1, dim, dtype=query.dtype)
    lse = torch.zeros(batch, heads, 1, 1)
    for b, ((k_b, v_b), length) in enumerate(zip(caches, lengths)):
        group = heads // kv_heads
        k_b = k_b[:, :length].float().repeat_interleave(group, dim=0)
        v_b = v_b[:, :length].float().repeat_interleave(group, dim=0)
        logits = scale * torch.einsum("nd,nsd->ns", query[b, :, 0].float(), k_b)
        if bias is not None:
            logits = logits + bias[b if bias.shape[0] > 1 else 0, :, 0, :length].float()
        if masked is not None:
            logits = logits.masked_fill(masked[b, :length], float("-inf"))
        lse[b, :, 0, 0] = torch.logsumexp(logits, dim=-1)
        out[b, :, 0] = torch.einsum("ns,nsd->nd", torch.softmax(logits, dim=-1), v_b).to(query.dtype)
    return out, (lse if softmax_lse_flag else torch.zeros(1))


def _lengths(actual_seq_lengths_kv, batch: int, limit: int) -> list:
    if actual_seq_lengths_kv is None:
        return [limit] * batch
    lengths = [int(n) for n in actual_seq_lengths_kv]
    _require(len(lengths) == 1 or len(lengths) >= batch,
             "actual_seq_lengths_kv must have one entry or at least B entries")
    lengths = lengths * batch if len(lengths) == 1 else lengths[:batch]
    _require(all(0 <= n <= limit for n in lengths), f"actual_seq_lengths_kv {lengths} exceed the KV length {limit}")
    return lengths


def _paged(key, value, block_table, actual_seq_lengths_kv, block_size, batch, kv_heads, dim):
    """Per batch entry, the [KV_N, length, D] keys and values the block table points at."""
    _require(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == batch,
             "block_table must be int32 [B, maxBlockNumPerSeq]")
    _require(0 < block_size <= 512 and block_size % 16 == 0,
             "block_size must be a positive multiple of 16 (float16/bfloat16), at most 512")
    _require(actual_seq_lengths_kv is not None, "actual_seq_lengths_kv is required with a block table")
    _require(key.numel() < 2 ** 31, "a paged key or value must have fewer than 2**31 elements")
    if key.dim() == 3:
        _require(key.shape[1] == block_size and key.shape[2] == kv_heads * dim,
                 f"paged key (blocknum, blocksize, H) must be [*, {block_size}, {kv_heads * dim}], "
                 f"got {tuple(key.shape)}")
        pages_k = key.view(key.shape[0], block_size, kv_heads, dim).transpose(1, 2)
        pages_v = value.view(key.shape[0], block_size, kv_heads, dim).transpose(1, 2)
    else:
        _require(key.dim() == 4 and tuple(key.shape[1:]) == (kv_heads, block_size, dim),
                 f"paged key (blocknum, KV_N, blocksize, D) must be [*, {kv_heads}, {block_size}, {dim}], "
                 f"got {tuple(key.shape)}")
        pages_k, pages_v = key, value
    lengths = _lengths(actual_seq_lengths_kv, batch, block_table.shape[1] * block_size)
    caches = []
    for b, length in enumerate(lengths):
        ids = block_table[b, : math.ceil(length / block_size)].long()
        _require(bool(((ids >= 0) & (ids < pages_k.shape[0])).all()), f"block ids {ids.tolist()} outside the cache")
        caches.append(tuple(p[ids].transpose(0, 1).reshape(kv_heads, -1, dim) for p in (pages_k, pages_v)))
    return caches, lengths, block_table.shape[1] * block_size


def _mask(atten_mask, batch: int, width: int):
    """atten_mask (B, S), (B, 1, S) or (B, 1, 1, S), True/1 = masked -> bool [B, S] or None."""
    if atten_mask is None:
        return None
    _require(atten_mask.dtype in MASK_DTYPES, f"atten_mask must be bool, int8 or uint8, got {atten_mask.dtype}")
    _require(atten_mask.dim() in (2, 3, 4) and atten_mask.shape[0] == batch
             and all(n == 1 for n in atten_mask.shape[1:-1]),
             f"atten_mask must be (B, S), (B, 1, S) or (B, 1, 1, S) with one query token, "
             f"got {tuple(atten_mask.shape)}")
    _require(atten_mask.shape[-1] >= width, f"atten_mask covers {atten_mask.shape[-1]} keys, fewer than {width}")
    return atten_mask.reshape(batch, -1).to(torch.bool)


def _pse(pse_shift, query, heads: int, width: int, scale: float):
    if pse_shift is None:
        return None
    _require(scale == 1.0, "pse_shift with scale != 1: the documentation does not say whether pse_shift is "
                           "added before or after the scale, so the emulation will not pick one")
    _require(pse_shift.dtype == query.dtype, "pse_shift must have the query's dtype")
    _require(pse_shift.dim() == 4 and pse_shift.shape[0] in (1, query.shape[0]) and pse_shift.shape[1] == heads
             and pse_shift.shape[2] == 1 and pse_shift.shape[3] >= width,
             f"pse_shift must be (B, N, 1, S) or (1, N, 1, S), got {tuple(pse_shift.shape)}")
    return pse_shift
