"""Shared pieces of the HF route tests: configs, cache arguments, decode loops."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from gsa_compile import GSAConfig
from gsa_compile.capture.hf import cache_argument

CHUNK = 8


def gsa_config(model, *, budget_tokens=4096, layers=4, **overrides) -> GSAConfig:
    """Layer 0 dense, layer 2 reusing layer 1's selection, the others selecting; thresholds 0
    so every decode step of a selecting layer runs sparse, on the CPU and on a GPU."""
    ratios = [1] + [0.5] * (layers - 1)
    reuse = [-1] * layers
    if layers > 2:
        reuse[2] = 1
    base = GSAConfig.for_model(model)
    fields = dict(
        chunk_size=CHUNK, top_k_ratio_per_layer=ratios, top_k_index_reuse=reuse, budget_tokens=budget_tokens,
        must_select_blocks=[0, -1], cpu_seq_len_threshold=0, cpu_concurrency_threshold=0,
        gpu_seq_len_threshold=0, gpu_concurrency_threshold=0,
    )
    return base.replace(**{**fields, **overrides})


def decode_logits(model, prompt, steps, cache=None, attention_mask=None):
    """Logits of the prefill's last position, then of `steps` greedy decode steps."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    name = cache_argument(model)
    logits = []
    with torch.no_grad():
        out = model(prompt, attention_mask=attention_mask, use_cache=True, **{name: cache})
        for _ in range(steps):
            last = out.logits[:, -1]
            logits.append(last)
            token = last.argmax(-1, keepdim=True)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
            out = model(token, attention_mask=attention_mask, use_cache=True, **{name: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1), cache


def generated_cache(output):
    """The cache generate() returns with return_dict_in_generate (renamed in transformers 5.24)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


def assert_codes_match_keys(cache) -> int:
    """Every codes layer holds exactly the codes of its keys (row for row, position for
    position); returns how many layers were checked."""
    from gsa_compile import functional
    from gsa_compile.capture.hf_cache import CodesMixin

    checked = 0
    for layer in cache.layers:
        if not isinstance(layer, CodesMixin):
            continue
        site = layer.gsa_site
        length = int(layer.get_seq_length())
        keys = site.hashed_keys(layer.keys[:, :, :length], layer.values[:, :, :length])
        expected = functional.encode(keys, site.hash_weight)
        assert torch.equal(layer.codes[:, :, :length], expected), f"layer {site.layer}: codes differ from its keys"
        if site.runtime.config.key_norm_weighting:
            torch.testing.assert_close(layer.key_norms[:, :, :length], functional.key_norms(keys))
        else:
            assert layer.key_norms is None
        checked += 1
    return checked
