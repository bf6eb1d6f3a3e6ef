"""Post-RoPE queries and keys of every attention layer on calibration sequences.

Each sequence is prefilled once through the attention probe. Per layer we keep the keys of
the whole sequence and the queries of its second half (HATA samples training queries there;
the last positions double as the decode-position queries the profiler measures). Everything
is kept as float32 on the CPU: calibration reads it many times in random order.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence, Union

import torch
from transformers import DynamicCache

from ..accuracy.tasks import Sample
from ..errors import GSAInputError
from .probe import attention_probe, dense_attention, forward_tokens

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerCapture:
    """One layer over all calibration sequences (lists indexed by sequence)."""

    queries: list  # [Hq, T_s, D]: the second half of sequence s
    keys: list  # [Hkv, L_s, D]: the whole sequence
    query_start: list  # position of queries[s][:, 0] in sequence s
    scale: float

    @property
    def kv_heads(self) -> int:
        return self.keys[0].shape[0]

    @property
    def groups(self) -> int:
        return self.queries[0].shape[0] // self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[-1]


def calibration_tokens(samples: Sequence[Union[Sample, torch.Tensor]]) -> list[torch.Tensor]:
    """1-D token tensors from Samples (their prompts) or token tensors."""
    tokens = []
    for index, sample in enumerate(samples):
        ids = sample.input_ids if isinstance(sample, Sample) else sample
        if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != 1):
            raise GSAInputError(
                f"calibration sample {index} must be an accuracy Sample or a 1-D (or [1, L]) tensor of "
                f"token ids, got {type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}"
            )
        if ids.numel() < 4:
            raise GSAInputError(f"calibration sample {index} has {ids.numel()} tokens; give at least 4")
        tokens.append(ids.reshape(-1).long())
    if not tokens:
        raise GSAInputError("calibration needs at least one sample")
    return tokens


@torch.no_grad()
def capture_layers(model, samples: Sequence[Union[Sample, torch.Tensor]], progress: bool = False,
                   latent: Optional[dict] = None) -> dict[int, LayerCapture]:
    """layer -> LayerCapture over the calibration sequences (one dense prefill each).

    latent: layer -> gsa_compile.mla.LatentLayout for MLA layers that select in the latent
    space: their capture holds the absorbed queries [H, T, latent + rope] and the latent keys
    [1, L, latent + rope] (c_kv and k_rope, read from the cache the prefill fills), whose dot
    products are the layer's logits."""
    from tqdm.auto import tqdm

    from ..capture.hf_mla import key_up_projection
    from ..mla import absorb_query, latent_keys

    latent = latent or {}
    captured: dict[int, LayerCapture] = {}

    def probe(layer, module, query, key, value, attention_mask, scaling, **kwargs):
        start = query.shape[2] // 2
        entry = captured.setdefault(layer, LayerCapture([], [], [], float(scaling if scaling is not None else query.shape[-1] ** -0.5)))
        queries = query[:, :, start:]
        if layer in latent:
            queries = absorb_query(queries.float(), key_up_projection(latent[layer], module).float(), latent[layer].nope_dim)
        entry.queries.append(queries[0].detach().float().cpu())
        if layer not in latent:  # latent keys come from the cache after the forward
            entry.keys.append(key[0].detach().float().cpu())
        entry.query_start.append(start)
        return dense_attention(module, query, key, value, attention_mask, scaling, **kwargs)

    device = next(model.parameters()).device
    with attention_probe(model, probe):
        for tokens in tqdm(calibration_tokens(samples), desc="capture q/k", unit="seq", disable=not progress):
            cache = DynamicCache(config=model.config) if latent else None
            forward_tokens(model, tokens[None].to(device), cache=cache)
            for layer in latent:
                # transformers' MLA modules cache c_kv as the layer's keys and k_rope as its values.
                stored = cache.layers[layer]
                captured[layer].keys.append(latent_keys(stored.keys, stored.values)[0].float().cpu())
    logger.info("captured q/k of %d layers on %d sequences", len(captured), len(samples))
    return dict(sorted(captured.items()))
