"""The NPU kernels on a device against the reference on the CPU: what to run first on an Ascend
host (`gsa-compile npu-check`), since CI only runs them against an emulation of torch_npu."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ... import functional as F
from ...errors import GSAInputError
from .. import reference, use_backend
from ..common import unpack_codes

# float16 attention is compared with the float32-accumulated reference rounded to float16.
ATTENTION_TOLERANCE = 4e-3
# A code bit whose exact projection lies within this fraction of the key's norm of zero may
# legitimately differ: float32 dot products on different hardware round differently.
SIGN_MARGIN = 1e-4
KV_HEADS, HEAD_DIM = 8, 128


@dataclass
class CheckResult:
    op: str
    case: str
    error: str
    ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def self_check(
    device: str = "npu", batch: int = 2, keys: int = 4096, chunk: int = 128, seed: int = 0
) -> list[CheckResult]:
    """Encode, select 8 blocks and attend with Llama-3.1-8B heads (32 query / 8 KV heads, d 128,
    128 hash bits), once with a cache that is already paged (keys a multiple of the chunk) and
    once with a partial last block and padded rows; codes and selections must equal the
    reference's (code bits whose projection is within rounding of zero excepted; selection is
    checked on the device's codes, attention on the device's selection, so each op is judged
    on its own), attention must agree to float16 rounding."""
    if keys % chunk or keys < 2 * chunk:
        raise GSAInputError(f"keys={keys} must be a multiple of chunk={chunk} and at least two chunks, so the "
                            f"first case is a paged cache and the second ({keys - chunk // 2} keys) a partial one")
    results = []
    weight = F.hash_weights(KV_HEADS, HEAD_DIM, 128, seed=seed)
    # Entering the backend first makes a missing or broken torch_npu the error, not the device string.
    with use_backend("npu"):
        for num_keys in (keys, keys - chunk // 2):
            results += _check_case(device, batch, num_keys, chunk, weight, seed)
    return results


def _check_case(device, batch, num_keys, chunk, weight, seed) -> list[CheckResult]:
    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads, dim, k = 4 * KV_HEADS, KV_HEADS, HEAD_DIM, 8
    query = torch.randn(batch, q_heads, 1, dim, generator=gen).half()
    key = torch.randn(batch, kv_heads, num_keys, dim, generator=gen).half()
    value = torch.randn(batch, kv_heads, num_keys, dim, generator=gen).half()
    valid = torch.arange(num_keys) < torch.randint(3 * num_keys // 4, num_keys + 1, (batch, 1), generator=gen)
    case = f"B={batch} L={num_keys} C={chunk} valid={valid.sum(-1).tolist()}"
    on = [t.to(device) for t in (query, key, value, valid, weight)]
    codes = F.encode(on[1], on[4])
    blocks = F.select_blocks(on[0], codes, on[4], chunk_size=chunk, num_blocks=k, valid=on[3])
    out = F.sparse_attention(on[0], on[1], on[2], blocks, chunk_size=chunk, valid=on[3])
    codes, blocks, out = codes.cpu(), blocks.cpu(), out.cpu()
    projection = torch.einsum("bhld,hdr->bhlr", key.double(), weight.double())
    decided = projection.abs() > SIGN_MARGIN * key.double().norm(dim=-1, keepdim=True)
    flipped = unpack_codes(codes) != unpack_codes(reference.encode(key, weight))
    wrong_bits, rounding_bits = int((flipped & decided).sum()), int((flipped & ~decided).sum())
    expected_blocks = reference.select_blocks(
        query, codes, weight, valid, None, chunk, k, [0, -2, -1], "max", "per_head")
    expected_out = reference.sparse_attention(query, key, value, blocks, valid, None, chunk, None, None)
    block_mismatches = int((blocks != expected_blocks).any(-1).sum())
    error = float((out.float() - expected_out.float()).abs().max())
    return [
        CheckResult("encode", case, f"{wrong_bits} code bits differ (+{rounding_bits} within rounding of 0)",
                    wrong_bits == 0),
        CheckResult("select_blocks", case, f"{block_mismatches} (row, KV head) selections differ",
                    block_mismatches == 0),
        CheckResult("sparse_attention", case, f"max |error| {error:.2e} (allowed {ATTENTION_TOLERANCE:.0e})",
                    error <= ATTENTION_TOLERANCE),
    ]
