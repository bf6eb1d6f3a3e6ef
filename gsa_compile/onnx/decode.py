"""A decode step with an explicit cache, the shape in which a causal LM leaves PyTorch as ONNX.

    step = DecodeStep(hf_model, config)           # Llama-family transformers model + GSAConfig
    export_decode_step(step, "model.onnx")
    tokens = greedy_decode(onnx_runner(session, step), step, prompt_ids, max_new_tokens=16)

Inputs: input_ids [B, T], attention_mask [B, P + T] (1 = real token), position_ids [B, T], then
per layer i past_key_values.{i}.key / .value [B, Hkv, P, D] and, for layers that compute a
selection, past_key_values.{i}.key_codes [B, Hkv, P, R/8]. Outputs: logits [B, T, V] and the
matching present.{i}.key / .value / .key_codes with P + T positions. Codes of the T new keys are
encoded (gsa.Encode) and appended to the past codes: the cache is never re-encoded. The same
graph serves prefill (P = 0, T = prompt length: dense attention, codes written) and decode."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as torch_F
from torch import nn

from .. import functional, ops
from ..config import GSAConfig
from ..errors import GSAConfigError, GSAError
from ..hashing import layer_hash_weight

# Decoder layers with q/k/v/o projections, optional per-head q/k RMS norms, rotary embeddings,
# pre-norm residual blocks and a gated MLP: what DecodeStep reimplements around the model's modules.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class DecodeStep(nn.Module):
    """One forward step of a Llama-family causal LM over explicit past key/value/codes tensors."""

    def __init__(self, model: nn.Module, config: GSAConfig, device_type: str = "cpu"):
        super().__init__()
        text = _check_supported(model)
        if config.num_hidden_layers != text.num_hidden_layers:
            raise GSAConfigError(
                f"num_hidden_layers is {config.num_hidden_layers} in the GSA config but the model has "
                f"{text.num_hidden_layers} layers"
            )
        if config.key_norm_weighting:
            raise GSAConfigError(
                "key_norm_weighting=True is not supported by the ONNX decode step (it would need past key "
                "norms as a cache input); allowed: False"
            )
        self.model = model
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.policies = [config.layer_policy(layer) for layer in range(config.num_hidden_layers)]
        self.sources = [config.selection_source(layer) for layer in range(config.num_hidden_layers)]
        self.site_options = {
            layer: config.attention_kwargs(layer, device_type)
            for layer, policy in enumerate(self.policies) if policy != "dense"
        }
        self.code_layers = [layer for layer, policy in enumerate(self.policies) if policy == "sparse"]
        for layer in self.code_layers:
            weight = layer_hash_weight(config, layer, self.num_kv_heads, self.head_dim)
            self.register_buffer(f"hash_weight_{layer}", weight, persistent=False)
        self.code_bytes = config.hash_bits // 8

    # ------------------------------------------------------------------ naming and shapes
    def past_names(self) -> list[str]:
        return [name for layer in range(len(self.policies)) for name in self._cache_names("past_key_values", layer)]

    def present_names(self) -> list[str]:
        return [name for layer in range(len(self.policies)) for name in self._cache_names("present", layer)]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]

    def _cache_names(self, prefix: str, layer: int) -> list[str]:
        names = [f"{prefix}.{layer}.key", f"{prefix}.{layer}.value"]
        return names + ([f"{prefix}.{layer}.key_codes"] if layer in self.code_layers else [])

    def empty_past(self, batch: int, length: int = 0) -> list[torch.Tensor]:
        """Zero past tensors of `length` positions (0 for a prefill)."""
        dtype = self.model.get_input_embeddings().weight.dtype
        past = []
        for layer in range(len(self.policies)):
            # Two tensors, not one twice: torch.export would merge aliased inputs into one.
            past += [torch.zeros(batch, self.num_kv_heads, length, self.head_dim, dtype=dtype) for _ in range(2)]
            if layer in self.code_layers:
                past.append(torch.zeros(batch, self.num_kv_heads, length, self.code_bytes, dtype=torch.uint8))
        return past

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask, position_ids, *past):
        decoder = self.model.model
        hidden = decoder.embed_tokens(input_ids)
        rotary = decoder.rotary_emb(hidden, position_ids)
        mask = step_mask(attention_mask, input_ids.shape[1], past[0].shape[2])
        cache = iter(past)
        presents, blocks_of = [], {}
        for layer, block in enumerate(decoder.layers):
            past_key, past_value = next(cache), next(cache)
            past_codes = next(cache) if layer in self.code_layers else None
            attn_out, present = self._attention(
                layer, block.self_attn, block.input_layernorm(hidden), rotary, mask,
                past_key, past_value, past_codes, blocks_of,
            )
            hidden = hidden + attn_out
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
            presents += present
        logits = self.model.lm_head(decoder.norm(hidden))
        return (logits, *presents)

    def _attention(self, layer, attn, hidden, rotary, mask, past_key, past_value, past_codes, blocks_of):
        batch, steps = hidden.shape[:2]
        query, key, value = (
            _heads(attn, name, hidden, self.head_dim) for name in ("q", "k", "v")
        )
        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        query, key = apply_rotary(query, key, *rotary)
        keys = torch.cat([past_key, key], dim=2)
        values = torch.cat([past_value, value], dim=2)
        present = [keys, values]
        policy = self.policies[layer]
        if policy == "dense":
            out = torch_F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=query.shape[1] != keys.shape[1]
            )
        elif policy == "sparse":
            weight = getattr(self, f"hash_weight_{layer}")
            codes = torch.cat([past_codes, functional.encode(key, weight)], dim=2)
            present.append(codes)
            out, blocks_of[layer] = functional.gsa_attention(
                query, keys, values, weight, key_codes=codes, attn_mask=mask, scale=attn.scaling,
                return_blocks=True, **self.site_options[layer],
            )
        else:
            source = self.sources[layer]
            weight = getattr(self, f"hash_weight_{source}")
            # Shape-only codes: a reusing site reads the source layer's selection, never codes.
            unused_codes = keys.new_zeros((), dtype=torch.uint8).expand(*keys.shape[:3], self.code_bytes)
            options = self.site_options[layer]
            out, _ = ops.attention(
                query, keys, values, unused_codes, weight, mask, None, blocks_of[source], False, attn.scaling,
                None, options["chunk_size"], options["top_k_ratio"], options["budget_tokens"],
                options["must_select"], options["repre"], options["scope"], options["seq_len_threshold"],
                options["concurrency_threshold"],
            )
        out = out.transpose(1, 2).reshape(batch, steps, -1)
        return attn.o_proj(out), present


def _heads(attn: nn.Module, name: str, hidden: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, hidden] -> [B, H, T, head_dim] through {name}_proj and the optional {name}_norm."""
    states = getattr(attn, f"{name}_proj")(hidden).view(*hidden.shape[:2], -1, head_dim)
    norm = getattr(attn, f"{name}_norm", None)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


def step_mask(attention_mask: torch.Tensor, steps: int, past_len) -> torch.Tensor:
    """bool [B, 1, T, P + T]: query t (at cache position P + t) sees real keys up to itself.
    It always sees itself, so a padding query has a finite (ignored) output rather than NaN."""
    key_pos = torch.arange(past_len + steps, device=attention_mask.device)
    query_pos = past_len + torch.arange(steps, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    real = attention_mask.bool()[:, None, None, :]
    return (causal[None, None] & real) | (key_pos[None, :] == query_pos[:, None])[None, None]


def _check_supported(model: nn.Module):
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "lm_head"):
        raise GSAError(
            f"DecodeStep supports causal LMs of model types {list(SUPPORTED_MODEL_TYPES)}, got "
            f"{type(model).__name__} (model_type {model_type!r}); export another model by writing its step "
            f"with gsa_compile.functional and passing it to gsa_compile.export_onnx"
        )
    layer_types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    if window and ("sliding_attention" in layer_types or getattr(text, "use_sliding_window", False)
                   or model_type == "mistral"):
        raise GSAError(
            f"DecodeStep does not implement sliding-window attention (sliding_window={window}); allowed: "
            f"full attention layers only (sliding_window=None)"
        )
    return text


# ------------------------------------------------------------------ export and greedy decoding
def export_decode_step(step: DecodeStep, path: Optional[str], *, batch: int = 2, prompt: int = 3, past: int = 5):
    """Export `step` to ONNX with dynamic batch, new tokens and past length; returns the ModelProto."""
    from .export import export_onnx

    vocab = step.model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab, (batch, prompt))
    mask = torch.ones(batch, past + prompt, dtype=torch.int64)
    positions = torch.arange(past, past + prompt).expand(batch, prompt)
    args = (input_ids, mask, positions, *step.empty_past(batch, past))
    dynamic = torch.export.Dim.DYNAMIC
    cache_dims = [{0: dynamic, 2: dynamic} for _ in step.past_names()]
    # forward(*past) takes the cache as one tuple argument in torch.export's view.
    dynamic_shapes = ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, tuple(cache_dims))
    with torch.no_grad():
        return export_onnx(
            step, args, path, dynamic_shapes=dynamic_shapes,
            input_names=step.input_names(), output_names=step.output_names(),
        )


def greedy_decode(
    run: Callable[[dict], Sequence[np.ndarray]], step: DecodeStep, input_ids: np.ndarray, max_new_tokens: int,
    attention_mask: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Prefill then `max_new_tokens` greedy steps, feeding each step's present back as past.
    `run(feeds)` returns the step's outputs in step.output_names() order (onnx_runner, torch_runner)."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch = input_ids.shape[0]
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    past = [t.numpy() for t in step.empty_past(batch)]
    tokens, generated = input_ids, []
    for _ in range(max_new_tokens):
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -tokens.shape[1]:]
        feeds = {"input_ids": tokens, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(step.past_names(), past))
        logits, *past = run(feeds)
        tokens = logits[:, -1:].argmax(-1).astype(np.int64)
        generated.append(tokens)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return np.concatenate(generated, axis=1)


def onnx_runner(session, step: DecodeStep) -> Callable[[dict], list]:
    names = step.output_names()
    return lambda feeds: session.run(names, feeds)


def torch_runner(step: DecodeStep) -> Callable[[dict], list]:
    """Runs `step` eagerly on the feeds greedy_decode builds (the PyTorch side of a comparison)."""
    order = step.input_names()

    def run(feeds):
        with torch.no_grad():
            outputs = step(*(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in order))
        return [t.float().numpy() if t.is_floating_point() else t.numpy() for t in outputs]

    return run
