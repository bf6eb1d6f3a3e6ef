"""Tiny random-weight transformers models (no download) for the HF route tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96

# eos None: generation never stops early, so token sequences have a fixed length to compare.
TOKENS = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **TOKENS)


def _llama_like(config_name, model_name, **extra):
    def build():
        config = getattr(transformers, config_name)(**{**COMMON, **extra})
        return getattr(transformers, model_name)(config)
    return build


BUILDERS = {
    "llama": _llama_like("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=16),
    "mistral": _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=None),
    "phi3": _llama_like("Phi3Config", "Phi3ForCausalLM", sliding_window=None),
    "gemma2": _llama_like(
        "Gemma2Config", "Gemma2ForCausalLM", head_dim=16, attn_logit_softcapping=20.0,
        final_logit_softcapping=30.0, sliding_window=8, layer_types=["full_attention"] * 4,
        attn_implementation="eager",
    ),
    "gemma3": _llama_like(
        "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=512, **TOKENS)),
    "gpt_neox": _llama_like("GPTNeoXConfig", "GPTNeoXForCausalLM", num_key_value_heads=None),
    "deepseek_v3": _llama_like(
        "DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=2, n_group=1, topk_group=1,
    ),
}


def build(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = BUILDERS[name]().to(dtype).eval()
    return model
