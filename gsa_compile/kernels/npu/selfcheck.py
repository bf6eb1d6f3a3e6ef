"""The NPU kernels on a device against the reference on the CPU: what to run first on an Ascend
host (`gsa-compile npu-check`), since CI only runs them against an emulation of torch_npu."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ... import functional as F
from .. import reference, use_backend

# float16 attention is compared with the float32-accumulated reference rounded to float16.
ATTENTION_TOLERANCE = 4e-3


@dataclass
class CheckResult:
    op: str
    case: str
    error: str
    ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def self_check(device: str = "npu", batch: int = 2, keys: int = 4096, seed: int = 0) -> list[CheckResult]:
    """Encode, select and sparse attention with Llama-3.1-8B heads (32 query / 8 KV heads, d 128,
    128 hash bits, 128-token chunks), once with a cache that is already paged (keys a multiple of
    128) and once with a partial last block and padded rows; codes and selections must equal the
    reference's, attention must agree to float16 rounding."""
    results = []
    # Entering the backend first makes a missing or broken torch_npu the error, not the device string.
    with use_backend("npu"):
        for num_keys in (keys, keys - 37):
            results += _check_case(device, batch, num_keys, seed)
    return results


def _check_case(device, batch, num_keys, seed) -> list[CheckResult]:
    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads, dim, chunk, k = 32, 8, 128, 128, 8
    query = torch.randn(batch, q_heads, 1, dim, generator=gen).half()
    key = torch.randn(batch, kv_heads, num_keys, dim, generator=gen).half()
    value = torch.randn(batch, kv_heads, num_keys, dim, generator=gen).half()
    valid = torch.arange(num_keys) < torch.randint(num_keys // 2, num_keys + 1, (batch, 1), generator=gen)
    weight = F.hash_weights(kv_heads, dim, 128, seed=seed)
    case = f"B={batch} L={num_keys} valid={valid.sum(-1).tolist()}"
    on = [t.to(device) for t in (query, key, value, valid, weight)]
    codes = F.encode(on[1], on[4])
    blocks = F.select_blocks(on[0], codes, on[4], chunk_size=chunk, num_blocks=k, valid=on[3])
    out = F.sparse_attention(on[0], on[1], on[2], blocks, chunk_size=chunk, valid=on[3])
    expected_codes = reference.encode(key, weight)
    expected_blocks = reference.select_blocks(query, expected_codes, weight, valid, None, chunk, k, [0, -2, -1],
                                              "max", "per_head")
    # Attention is checked on the device's own selection so a selection mismatch is reported once.
    expected_out = reference.sparse_attention(query, key, value, blocks.cpu(), valid, None, chunk, None, None)
    code_mismatches = int((codes.cpu() != expected_codes).any(-1).sum())
    block_mismatches = int((blocks.cpu() != expected_blocks).any(-1).sum())
    error = float((out.cpu().float() - expected_out.float()).abs().max())
    return [
        CheckResult("encode", case, f"{code_mismatches} keys differ", code_mismatches == 0),
        CheckResult("select_blocks", case, f"{block_mismatches} (row, KV head) selections differ", block_mismatches == 0),
        CheckResult("sparse_attention", case, f"max |error| {error:.2e} (allowed {ATTENTION_TOLERANCE:.0e})",
                    error <= ATTENTION_TOLERANCE),
    ]
