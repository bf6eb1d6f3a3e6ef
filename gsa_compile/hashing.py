"""Hash weights: seeded Haar-orthogonal projections, MLA block-diagonal weights, trained files."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from .errors import GSAConfigError, GSAError
from .sharding import HeadShard

if TYPE_CHECKING:
    from .config import GSAConfig

logger = logging.getLogger(__name__)


def hash_weights(num_kv_heads: int, head_dim: int, hash_bits: int, seed: int = 0) -> torch.Tensor:
    """float32 [num_kv_heads, head_dim, hash_bits] with Haar-orthogonal columns.

    Columns come in groups of at most `head_dim`; each group is orthonormal (QR of a Gaussian
    with the sign fix that makes Q Haar-distributed). Drawn in float64 from a seeded CPU
    generator and rounded to float32, so every machine gets the same bits for a seed."""
    for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("hash_bits", hash_bits)):
        if not isinstance(value, int) or value < 1:
            raise GSAConfigError(f"hash_weights: {name} must be a positive integer, got {value!r}")
    if hash_bits % 8:
        raise GSAConfigError(f"hash_weights: hash_bits must be a multiple of 8, got {hash_bits}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    heads = []
    for _ in range(num_kv_heads):
        groups, remaining = [], hash_bits
        while remaining:
            width = min(remaining, head_dim)
            gaussian = torch.randn(head_dim, width, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gaussian)
            groups.append(q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1))
            remaining -= width
        heads.append(torch.cat(groups, dim=1))
    return torch.stack(heads).to(torch.float32)


def mla_hash_weights(latent: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Block-diagonal [H, Dl + Dr, Rl + Rr]: latent dims hash into the first Rl bits, rope dims
    into the last Rr bits, so MLA keys [latent | rope] encode with the ordinary encode op."""
    heads, d_latent, r_latent = latent.shape
    _, d_rope, r_rope = rope.shape
    weight = latent.new_zeros(heads, d_latent + d_rope, r_latent + r_rope)
    weight[:, :d_latent, :r_latent] = latent
    weight[:, d_latent:, r_latent:] = rope
    return weight


def layer_hash_weight(
    config: "GSAConfig", layer: int, num_kv_heads: int, key_dim: int, shard: Optional[HeadShard] = None
) -> torch.Tensor:
    """The hash weight of `layer` for keys of `key_dim` dims, from the config's source.

    "random": seeded by hash_seed + layer. "fixed": read from the safetensors file(s) the config
    names (tensor "layers.{layer}", shape [num_kv_heads, dims, bits]). MLA configs hash the
    last qk_rope_head_dim dims of a key separately from the rest (docs/semantics.md, rule 1).
    shard: under tensor parallelism, the `num_kv_heads` heads this rank holds; the weight is
    made (drawn or read) for all the model's heads and these rows are kept."""
    if shard is None:
        return _model_hash_weight(config, layer, num_kv_heads, key_dim)
    if shard.count != num_kv_heads:
        raise GSAError(
            f"layer {layer}: the tensor-parallel shard holds {shard.count} KV heads but its keys have {num_kv_heads}"
        )
    weight = _model_hash_weight(config, layer, shard.total, key_dim)
    return weight[shard.first: shard.first + shard.count].contiguous()


def _model_hash_weight(config: "GSAConfig", layer: int, num_kv_heads: int, key_dim: int) -> torch.Tensor:
    seed = config.hash_seed + layer
    if not config.is_mla:
        if config.hash_weight_type == "fixed":
            weight = _load_layer(config, "hash_weight", layer)
        else:
            weight = hash_weights(num_kv_heads, key_dim, config.hash_bits, seed=seed)
        _check_shape(weight, (num_kv_heads, key_dim, config.hash_bits), "hash_weight", layer)
        return weight
    rope_dim = config.qk_rope_head_dim
    latent_dim = key_dim - rope_dim
    if latent_dim < 1:
        raise GSAConfigError(
            f"qk_rope_head_dim={rope_dim} leaves no latent dims in keys of {key_dim} dims"
        )
    if config.hash_weight_type == "fixed":
        latent = _load_layer(config, "hash_weight_kv_lora", layer)
        rope = _load_layer(config, "hash_weight_qk_rope", layer)
    else:
        latent = hash_weights(num_kv_heads, latent_dim, config.hash_bits_kv_lora, seed=seed)
        rope = hash_weights(num_kv_heads, rope_dim, config.hash_bits_qk_rope, seed=seed + 1_000_003)
    _check_shape(latent, (num_kv_heads, latent_dim, config.hash_bits_kv_lora), "hash_weight_kv_lora", layer)
    _check_shape(rope, (num_kv_heads, rope_dim, config.hash_bits_qk_rope), "hash_weight_qk_rope", layer)
    return mla_hash_weights(latent, rope)


def save_hash_weights(weights: dict[int, torch.Tensor], path: str) -> None:
    """Write per-layer weights as the safetensors file a "fixed" config names."""
    from safetensors.torch import save_file

    save_file({f"layers.{layer}": w.detach().to(torch.float32).contiguous() for layer, w in weights.items()}, path)


def _load_layer(config: "GSAConfig", field_name: str, layer: int) -> torch.Tensor:
    from safetensors import safe_open

    path = config.resolve_path(getattr(config, field_name))
    try:
        with safe_open(path, framework="pt") as handle:
            key = f"layers.{layer}"
            if key not in handle.keys():
                raise GSAConfigError(
                    f"{field_name} file {path} has no tensor {key!r}; it holds {sorted(handle.keys())}"
                )
            return handle.get_tensor(key).to(torch.float32)
    except FileNotFoundError as exc:
        raise GSAConfigError(f"{field_name} names {path}, which does not exist") from exc


def _check_shape(weight: torch.Tensor, expected: tuple, field_name: str, layer: int) -> None:
    if tuple(weight.shape) != expected:
        raise GSAConfigError(
            f"{field_name} for layer {layer} has shape {tuple(weight.shape)}, the model needs "
            f"{expected} ([kv_heads, key dims, bits])"
        )
