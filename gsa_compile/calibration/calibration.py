"""`gsa_compile.calibrate(model, samples)`: trained hash weights (and optionally a profiled
layer policy) for a transformers model, written as a config that gsa_compile.optimize loads."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

import torch

from ..config import GSAConfig
from ..errors import GSAConfigError
from ..hashing import layer_hash_weight, save_hash_weights
from ..kernels.cpu.threads import at_most_threads
from .capture import LayerCapture, capture_layers
from .hata import HataSettings, train_head
from .profile import ProfileResult, apply_profile, profile_layers

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "hash_weights.safetensors"
CONFIG_FILE = "gsa_config.json"
MLA_WEIGHT_FILES = {"hash_weight_kv_lora": "hash_weights_kv_lora.safetensors",
                    "hash_weight_qk_rope": "hash_weights_qk_rope.safetensors"}


@dataclasses.dataclass
class CalibrationResult:
    config: GSAConfig  # hash_weight_type "fixed" once written; the profiled policy if asked
    weights: dict  # layer -> trained float32 [Hkv, D, R] (MLA: [1, latent + rope, R], block-diagonal)
    initial_weights: dict  # layer -> the random weights training started from
    history: dict  # layer -> [per KV head: [per step: {"loss", "similarity", ...}]]
    profile: Optional[ProfileResult] = None
    config_path: Optional[str] = None


def calibrate(
    model,
    samples: Sequence,
    config: Optional[GSAConfig] = None,
    *,
    epochs: int = 15,
    iterations: int = 20,
    settings: Optional[HataSettings] = None,
    out_dir: Optional[str] = None,
    profile: bool = False,
    profile_options: Optional[dict] = None,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """Train HATA hash weights per layer and KV head on `samples` (accuracy Samples or 1-D
    token tensors) run through `model` (a transformers model with sdpa or eager attention).

    Training starts from the config's random weights (same bits), so the result is directly
    comparable with them. With `profile`, the layer profiler also sets the per-layer ratios
    and index reuse (`profile_options` go to calibrate.profile.profile_layers). With
    `out_dir`, writes hash_weights.safetensors and gsa_config.json (hash_weight_type "fixed",
    hash_weight relative to the JSON) there.

    An MLA config (is_mla) trains the latent-space weights of each layer: absorbed queries and
    latent keys [c_kv | k_rope] (gsa_compile.mla) through one block-diagonal weight that stays
    block-diagonal, written as its two parts (hash_weight_kv_lora, hash_weight_qk_rope)."""
    config = GSAConfig.for_model(model) if config is None else config
    settings = dataclasses.replace(settings or HataSettings(), epochs=epochs, iterations=iterations)
    latent = mla_layouts(model, config) if config.is_mla else {}
    captures = capture_layers(model, samples, progress=progress, latent=latent)
    if len(captures) != config.num_hidden_layers:
        raise GSAConfigError(
            f"the config has num_hidden_layers={config.num_hidden_layers} but the model ran "
            f"{len(captures)} attention layers"
        )
    generator = torch.Generator().manual_seed(seed)
    weights, initial, history = {}, {}, {}
    random = config.replace(hash_weight_type="random", hash_weight=None, hash_weight_kv_lora=None,
                            hash_weight_qk_rope=None)
    for layer, capture in captures.items():
        initial[layer] = layer_hash_weight(random, layer, capture.kv_heads, capture.head_dim)
        # An MLA weight is block-diagonal (latent dims -> latent bits, rope dims -> rope bits): it stays so.
        structure = initial[layer][0] != 0 if config.is_mla else None
        weights[layer], history[layer] = _train_layer(layer, capture, initial[layer], settings, generator, progress,
                                                      structure)
    result = CalibrationResult(config, weights, initial, history)
    if profile:
        result.profile = profile_layers(captures, config, **(profile_options or {}))
        result.config = apply_profile(config, result.profile)
    if out_dir is not None:
        write_calibration(result, out_dir)
    return result


def mla_layouts(model, config: GSAConfig) -> dict:
    """layer -> LatentLayout of every attention layer of an MLA model (calibration trains the
    latent-space weights the HF route selects with); refuses a model that has none."""
    from ..capture.hf_mla import latent_layout
    from .probe import attention_layers

    layouts = {}
    for layer, module in attention_layers(model).items():
        layout, why = latent_layout(module, config)
        if layout is None:
            raise GSAConfigError(
                f"calibrate with is_mla true trains latent-space weights, but layer {layer} "
                f"({type(module).__name__}) selects over expanded keys: {why}; calibrate with is_mla false "
                f"and head_dim set to the expanded key width instead"
            )
        layouts[layer] = layout
    return layouts


def _train_layer(layer: int, capture: LayerCapture, initial: torch.Tensor, settings: HataSettings, generator, progress: bool,
                 structure=None):
    from tqdm.auto import tqdm

    steps = capture.kv_heads * settings.epochs * settings.iterations
    heads, history = [], []
    # A training step is a few small matrix products: on a CPU one thread runs them without the
    # barrier waits of several (a short `gsa-compile eval`'s calibration took 23 s instead of 40 s
    # on two cores another process kept busy). Other devices ignore torch's CPU threads.
    with tqdm(total=steps, desc=f"hash layer {layer}", unit="step", disable=not progress) as bar, \
            at_most_threads(1):
        for kv_head in range(capture.kv_heads):
            weight, losses = train_head(capture, kv_head, initial[kv_head], settings, generator, on_step=bar.update,
                                        structure=structure)
            heads.append(weight)
            history.append(losses)
            bar.set_postfix(loss=f"{losses[-1]['loss']:.3f}")
    first, last = history[0][0], history[0][-1]
    logger.info("layer %d: loss %.4f -> %.4f (KV head 0)", layer, first["loss"], last["loss"])
    return torch.stack(heads), history


def write_calibration(result: CalibrationResult, out_dir: str) -> str:
    """Write the weights and a "fixed" config naming them; returns the config path."""
    os.makedirs(out_dir, exist_ok=True)
    config = result.config
    if config.is_mla:
        # The two parts of each block-diagonal weight, one file each, as an MLA config names them.
        latent_dims, latent_bits = config.kv_lora_rank, config.hash_bits_kv_lora
        parts = {
            "hash_weight_kv_lora": {layer: w[:, :latent_dims, :latent_bits] for layer, w in result.weights.items()},
            "hash_weight_qk_rope": {layer: w[:, latent_dims:, latent_bits:] for layer, w in result.weights.items()},
        }
        for field_name, weights in parts.items():
            save_hash_weights(weights, os.path.join(out_dir, MLA_WEIGHT_FILES[field_name]))
        fixed = config.replace(hash_weight_type="fixed", **MLA_WEIGHT_FILES)
    else:
        save_hash_weights(result.weights, os.path.join(out_dir, WEIGHTS_FILE))
        fixed = config.replace(hash_weight_type="fixed", hash_weight=WEIGHTS_FILE)
    config_path = os.path.join(out_dir, CONFIG_FILE)
    fixed.save(config_path)
    result.config = GSAConfig.load(config_path)
    result.config_path = config_path
    logger.info("wrote %s and %s", config_path, WEIGHTS_FILE)
    return config_path
