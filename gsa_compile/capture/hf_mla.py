"""Latent-space selection (gsa_compile.mla) for transformers' MLA attention modules.

transformers' MLA modules (DeepSeek-V2/V3, GLM-4-MoE-Lite, Kimi-Linear, LongCat-Flash, MiniCPM3,
Mistral 4, Youtu, ...) cache the latents themselves: the cache layer's "keys" are c_kv
[B, 1, L, kv_lora_rank] (after the kv_a layernorm) and its "values" the rope keys k_rope
[B, 1, L, qk_rope_head_dim], and `expand_kv` builds every head's keys and values from them
right before attention. So the latent codes are made where the latents enter the cache (the
codes layer's update, hf_cache), and a decode call absorbs the query it receives through the
module's kv_b_proj. The attention over the selected blocks is the ordinary sparse attention on
the keys and values the module expanded."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from ..config import GSAConfig
from ..errors import GSAConfigError
from ..mla import LatentLayout

logger = logging.getLogger(__name__)


def latent_layout(module: nn.Module, config: GSAConfig, shard=None) -> tuple[Optional[LatentLayout], str]:
    """(layout, "") when the module's selection runs in the latent space, else (None, why not).
    An MLA config whose latent dims are not the module's is refused. shard: the site's
    tensor-parallel HeadShard, if any."""
    if not hasattr(module, "expand_kv"):
        return None, "not an MLA module that caches latents"
    if not config.is_mla:
        return None, "is_mla is false: selection over the expanded per-head keys"
    if shard is not None:
        # A rank holds some of the heads, and the latent selection sums over all of them:
        # per-head selection over the expanded keys is the same at every tensor-parallel size.
        return None, "tensor parallelism shards the heads: selection over the expanded per-head keys"
    dims = {name: getattr(module, name, None) for name in
            ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")}
    if not all(isinstance(value, int) and value > 0 for value in dims.values()):
        return None, f"MLA module without positive integer dims {dims}"
    if (config.kv_lora_rank, config.qk_rope_head_dim) != (dims["kv_lora_rank"], dims["qk_rope_head_dim"]):
        raise GSAConfigError(
            f"the MLA config has kv_lora_rank={config.kv_lora_rank}, qk_rope_head_dim={config.qk_rope_head_dim} "
            f"but layer {module.layer_idx} has kv_lora_rank={dims['kv_lora_rank']}, qk_rope_head_dim="
            f"{dims['qk_rope_head_dim']}; use a config made for this model (GSAConfig.for_model(model))"
        )
    layout = LatentLayout(dims["num_heads"], dims["qk_nope_head_dim"], dims["qk_rope_head_dim"], dims["v_head_dim"],
                          dims["kv_lora_rank"])
    projection = getattr(module, "kv_b_proj", None)
    expected = (layout.heads * (layout.nope_dim + layout.value_dim), layout.latent_dim)
    if type(projection) is not nn.Linear or projection.bias is not None or not projection.weight.is_floating_point():
        # A quantized or biased up-projection has no W_UK to absorb the query through.
        return None, f"kv_b_proj is {type(projection).__name__}, not a float nn.Linear without bias: expanded keys"
    if tuple(projection.weight.shape) != expected:
        return None, f"kv_b_proj weight is {tuple(projection.weight.shape)}, not {expected}: expanded keys"
    return layout, ""


def key_up_projection(layout: LatentLayout, module: nn.Module) -> torch.Tensor:
    """W_UK [H, nope, latent] of the module's current kv_b_proj (a view: no copy per call)."""
    return layout.key_up_projection(module.kv_b_proj.weight)
