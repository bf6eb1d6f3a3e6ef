"""Tiny random-weight causal LMs of several architectures and the check every one of them must
pass: its ONNX decode step, run greedily in onnxruntime (present fed back as past), gives the
tokens of the PyTorch GSA model (gsa_compile.optimize + generate)."""

from __future__ import annotations

import copy

import numpy as np
import torch

import gsa_compile
from gsa_compile.onnx import DecodeStep, export_decode_step, greedy_decode, onnx_runner

VOCAB, PROMPT, NEW_TOKENS, LAYERS = 96, 40, 16, 2
SIZES = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
    # mixture of experts, MLA
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
)
TOKENS = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0)

# model type -> config fields beyond SIZES (what makes the architecture's interesting part run).
ARCHITECTURES = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "olmo2": {},
    "phi3": dict(sliding_window=None),
    "gemma2": dict(head_dim=16, attn_logit_softcapping=20.0, final_logit_softcapping=30.0, sliding_window=8,
                   layer_types=["full_attention"] * LAYERS, attn_implementation="eager"),
    "gemma3_text": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "gpt2": {},
    "gpt_neox": {},
    "deepseek_v3": dict(num_key_value_heads=4),
    "granite": {},
    "starcoder2": dict(sliding_window=None),
    "cohere": {},
    "stablelm": {},
    "phi": {},
    "qwen3_moe": dict(head_dim=16),
    "olmo": {},
    "helium": dict(head_dim=16),
    "jetmoe": dict(kv_channels=16),
    "minimax": dict(layer_types=["full_attention", "linear_attention"]),
}


def build(model_type: str, layers: int = LAYERS):
    """A seeded tiny model of `model_type` (every SIZES field the family's config has)."""
    import transformers

    config_class = transformers.CONFIG_MAPPING[model_type]
    default = config_class()
    extra = ARCHITECTURES.get(model_type, {})
    sizes = {**SIZES, "num_hidden_layers": layers}
    kwargs = {name: value for name, value in {**sizes, **TOKENS}.items() if _has(default, name)}
    config = config_class(**{**kwargs, **extra})
    torch.manual_seed(0)  # transformers picks sdpa where the family supports it, else eager
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = None, 0, 1
    return model


def _has(config, name: str) -> bool:
    try:
        getattr(config, name)
    except Exception:  # a per-layer attribute that refuses global access
        return False
    return True


def gsa_config(model, **overrides):
    """Every layer selects (layer 1 reuses layer 0's selection), 4-token blocks, sparse from 8 keys."""
    layers = model.config.get_text_config().num_hidden_layers
    reuse = [-1] + [0] * (layers - 1)
    fields = dict(chunk_size=4, top_k_ratio_per_layer=[0.4] * layers, top_k_index_reuse=reuse,
                  must_select_blocks=[0, -1], cpu_seq_len_threshold=8)
    config = gsa_compile.GSAConfig.for_model(model, **{**fields, **overrides})
    if config.is_mla:  # the ONNX step lowers MLA's selection over the expanded keys only
        head_dim = model.config.qk_nope_head_dim + model.config.qk_rope_head_dim
        config = config.replace(is_mla=False, head_dim=head_dim, hash_bits=8 * -(-head_dim // 8))
    return config


def prompt(batch: int = 2, pad: int = 5):
    ids = np.random.default_rng(0).integers(2, VOCAB, (batch, PROMPT))
    mask = np.ones_like(ids)
    mask[-1, :pad] = 0  # the last row is left-padded
    return ids, mask


def generated_by_pytorch(model, config, ids, mask, new_tokens: int = NEW_TOKENS):
    """(tokens, sparse calls) of the Hugging Face GSA route on a copy of `model`."""
    import transformers

    optimized = gsa_compile.optimize(copy.deepcopy(model), config)
    # Plain greedy decoding: a family's generation defaults (a forced end token, repetition
    # penalties, suppressed tokens) are no part of the decode step the export runs.
    optimized.generation_config = transformers.GenerationConfig(bos_token_id=1, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = optimized.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )
    return out[:, ids.shape[1]:].numpy(), optimized.gsa_runtime.total_stats().sparse_calls


def generated_by_onnxruntime(model, config, path, ids, mask, new_tokens: int = NEW_TOKENS, session=None):
    """(tokens, ModelProto) of the exported decode step decoded greedily in onnxruntime."""
    import onnxruntime as ort

    step = DecodeStep(copy.deepcopy(model), config)
    proto = export_decode_step(step, str(path))
    session = session or ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return greedy_decode(onnx_runner(session, step), step, ids, new_tokens, attention_mask=mask), proto
