"""Latent-space selection for multi-head latent attention (MLA: DeepSeek-V2/V3 and the models
that share their attention).

An MLA layer keeps one compressed latent per token, c_kv (kv_lora_rank dims, after the
kv_a layernorm), and one rope key shared by all heads, k_rope (qk_rope_head_dim dims). Head h's
key is [W_UK[h] c_kv | k_rope], with W_UK[h] the key rows of head h in kv_b_proj, so for a
query q = [q_nope | q_rope] of head h

    q . k = (W_UK[h]^T q_nope) . c_kv + q_rope . k_rope = q_latent[h] . [c_kv | k_rope]

where q_latent[h] = [W_UK[h]^T q_nope | q_rope] is the query absorbed into the latent space.
GSA then runs on latent keys [c_kv | k_rope] as one KV head shared by every query head:

- key code: the latent key hashed with the block-diagonal weight of hashing.mla_hash_weights
  (c_kv into hash_bits_kv_lora bits, k_rope into hash_bits_qk_rope bits), one code of
  (hash_bits_kv_lora + hash_bits_qk_rope) / 8 bytes per token whatever the number of heads;
- similarity of a batch row to token j: the sum over all H query heads of
  (R - 2 * hamming(code(q_latent[h]), code_j)), R the code's bits: each bit counts once, so the
  latent and rope parts weigh in by their bit counts (as a Hamming distance over the whole
  code does). The group of a selection is all H heads; kernels sum it through the sign
  planes of kernels.common.plane_layout (1 + log2 H planes, 8 for H = 128);
- one selection per batch row, used by every head; attention stays exact over the selected
  blocks of the keys and values the model attends.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .kernels.common import projection_dtype


@dataclasses.dataclass(frozen=True)
class LatentLayout:
    """Dims of one MLA layer: H heads, key = [nope | rope] per head, kv_b_proj rows per head
    [nope key rows | value rows] over the latent."""

    heads: int
    nope_dim: int
    rope_dim: int
    value_dim: int
    latent_dim: int

    @property
    def code_dim(self) -> int:
        """Dims of a latent key [c_kv | k_rope]: what the hash weight takes."""
        return self.latent_dim + self.rope_dim

    def key_up_projection(self, kv_b_weight: Tensor) -> Tensor:
        """W_UK as [H, nope, latent] (a view of kv_b_proj's weight [H * (nope + v), latent])."""
        return kv_b_weight.view(self.heads, self.nope_dim + self.value_dim, self.latent_dim)[:, : self.nope_dim]


def latent_keys(c_kv: Tensor, k_rope: Tensor) -> Tensor:
    """[B, 1, L, latent] and [B, 1, L, rope] -> the latent keys [B, 1, L, latent + rope]."""
    return torch.cat([c_kv, k_rope.to(c_kv.dtype)], dim=-1)


def absorb_query(query: Tensor, w_uk: Tensor, nope_dim: int) -> Tensor:
    """query [B, H, T, nope + rope] (as attention sees it: rope applied) and W_UK [H, nope,
    latent] -> q_latent [B, H, T, latent + rope]. The product runs in the query's dtype (a
    bf16 model keeps W_UK in bf16: no float32 copy of it per call); the hash projection that
    follows runs in float32."""
    q_nope, q_rope = query[..., :nope_dim], query[..., nope_dim:]
    absorbed = torch.matmul(q_nope, w_uk.to(query.dtype).unsqueeze(0))
    return torch.cat([absorbed, q_rope], dim=-1)


def latent_select_blocks(
    query: Tensor, w_uk: Tensor, nope_dim: int, latent_codes: Tensor, weight: Tensor, valid: Optional[Tensor],
    key_norms: Optional[Tensor], chunk_size: int, num_blocks: int, must_select: Sequence[int], repre: str,
    limit: Optional[Tensor] = None,
) -> Tensor:
    """One selection per batch row from the latent codes [B, 1, L, R/8], as int32 [B, H, k]
    (the same blocks for every head, the layout gsa::sparse_attention takes)."""
    absorbed = absorb_query(query, w_uk, nope_dim)
    blocks = ops.select_blocks(absorbed, latent_codes, weight, valid, key_norms, chunk_size, num_blocks,
                               list(must_select), repre, "per_head", limit)
    return blocks.expand(-1, query.shape[1], -1)


def reference_similarity(query: Tensor, w_uk: Tensor, nope_dim: int, c_kv: Tensor, k_rope: Tensor,
                         weight: Tensor) -> Tensor:
    """float64 [B, L]: the latent similarity written out literally (no packing, no planes):
    sum over heads and bits of the +-1 agreement of the hashed absorbed query with the hashed
    latent key. The oracle the kernels' scores are tested against."""
    dtype = projection_dtype(query)
    absorbed = absorb_query(query, w_uk, nope_dim)[:, :, 0].to(dtype)  # [B, H, Dl]
    keys = latent_keys(c_kv, k_rope)[:, 0].to(dtype)  # [B, L, Dl]
    w = weight[0].to(device=query.device, dtype=dtype)
    query_signs = torch.where(absorbed @ w >= 0, 1.0, -1.0).to(torch.float64)
    key_signs = torch.where(keys @ w >= 0, 1.0, -1.0).to(torch.float64)
    return torch.einsum("bhr,blr->bl", query_signs, key_signs)
