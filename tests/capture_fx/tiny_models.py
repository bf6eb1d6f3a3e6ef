"""Tiny transformers models (random weights, no download) for the FX route tests."""

from __future__ import annotations

import torch

from gsa_compile import GSAConfig
from gsa_compile.api import config_for_graph

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# model type -> (config overrides, attention implementation)
MODELS = {
    "llama": ({}, "sdpa"),
    "qwen2": ({}, "sdpa"),
    "qwen3": ({"head_dim": 8}, "sdpa"),
    "mistral": ({"sliding_window": None}, "sdpa"),
    "phi3": ({"pad_token_id": 0}, "sdpa"),
    "gemma2": ({"head_dim": 8, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 5.0,
                "layer_types": ["full_attention", "full_attention"]}, "eager"),
    "gemma3_text": ({"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 8,
                     "layer_types": ["sliding_attention", "full_attention"]}, "sdpa"),
    "gpt2": ({"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}, "sdpa"),
    "gpt_neox": ({"rotary_pct": 0.5}, "sdpa"),
    "deepseek_v3": ({"kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
                     "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                     "topk_group": 1, "moe_intermediate_size": 16, "first_k_dense_replace": 1,
                     "num_key_value_heads": 4}, "sdpa"),
}
# Layers a model keeps dense by its own structure (sliding-window layers).
DENSE_BY_MODEL = {"gemma3_text": 1}


def tiny_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides, implementation = MODELS[model_type]
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    config._attn_implementation = implementation
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def sparse_config(model, budget_tokens: int, chunk_size: int = 4) -> GSAConfig:
    """Every attention layer sparse (the model's sliding-window layers stay dense) with a token
    budget, no must-select blocks and thresholds 0, so the sparse path runs at small lengths:
    caches up to `budget_tokens` keys are attended whole (equal to dense), longer ones are not."""
    layer_types = getattr(model.config, "layer_types", None) or []
    config = config_for_graph(model)
    ratios = [1 if i < len(layer_types) and "sliding" in str(layer_types[i]) else 0.5
              for i in range(config.num_hidden_layers)]
    return config.replace(top_k_ratio_per_layer=ratios, chunk_size=chunk_size, must_select_blocks=[],
                          cpu_seq_len_threshold=0, cpu_concurrency_threshold=0, budget_tokens=budget_tokens)
