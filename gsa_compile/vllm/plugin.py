"""The vLLM general plugin: `register()` runs in every vLLM process (engine, workers) before the
model is built. With GSA_VLLM_CONFIG naming a GSA config (a shipped model name or a JSON
file in the UCM GSA config format) it

1. makes vLLM's CPU attention backend the GSA one (gsa_compile.vllm.backend), and
2. gives every attention layer the config makes sparse its GSA plan, and every layer that
   computes its own selection a codes cache beside it.

Without GSA_VLLM_CONFIG it does nothing, so installing gsa-compile never changes vLLM."""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

from ..config import GSAConfig, load_config
from ..errors import GSAConfigError

logger = logging.getLogger(__name__)

ENV_VAR = "GSA_VLLM_CONFIG"
BACKEND_PATH = "gsa_compile.vllm.backend.GSACPUAttentionBackend"

_config: Optional[GSAConfig] = None


def active_config() -> GSAConfig:
    """The GSA config this process runs with (loaded once from GSA_VLLM_CONFIG)."""
    global _config
    if _config is None:
        name = os.environ.get(ENV_VAR)
        if not name:
            raise GSAConfigError(f"{ENV_VAR} is not set: name a shipped GSA config or a JSON file")
        _config = load_config(name)
    return _config


def register() -> None:
    """Entry point of `vllm.general_plugins`."""
    if not os.environ.get(ENV_VAR):
        logger.debug("%s is not set: the GSA vLLM plugin stays off", ENV_VAR)
        return
    config = active_config()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():
        raise GSAConfigError(
            f"{ENV_VAR} is set but the GSA vLLM backend supports vLLM's CPU platform only; this "
            f"platform is {current_platform.device_name!r}"
        )
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    _wrap_attention_init()
    logger.info("GSA vLLM plugin on: config %r (%d layers)", config.model_name, config.num_hidden_layers)


def _wrap_attention_init() -> None:
    from vllm.model_executor.layers.attention import Attention

    if getattr(Attention.__init__, "_gsa_wrapped", False):
        return
    original = Attention.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _attach(self)

    __init__._gsa_wrapped = True
    Attention.__init__ = __init__


def _attach(layer) -> None:
    """Give one vLLM Attention layer its GSA plan (or None: the layer stays dense)."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backend import AttentionType

    from .backend import GSACodesCache, GSALayer, plan_layer

    layer.gsa = None
    if layer.attn_type != AttentionType.DECODER or layer.kv_sharing_target_layer_name is not None \
            or layer.sliding_window is not None:
        return
    config = active_config()
    vllm_config = get_current_vllm_config()
    index = extract_layer_index(layer.layer_name)
    model_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
    if config.num_hidden_layers != model_layers:
        raise GSAConfigError(
            f"the GSA config has num_hidden_layers={config.num_hidden_layers} but the model served has "
            f"{model_layers} layers"
        )
    if config.head_dim != layer.head_size:
        raise GSAConfigError(
            f"the GSA config has head_dim={config.head_dim} but layer {layer.layer_name} has head size "
            f"{layer.head_size}"
        )
    total_kv_heads = vllm_config.model_config.get_total_num_kv_heads()
    plan = plan_layer(config, index, total_kv_heads, layer.num_kv_heads, layer.head_size,
                      get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    if plan is None:
        return
    policy, source, kwargs, weight = plan
    codes = None
    if policy == "sparse":
        codes = GSACodesCache(
            f"{layer.layer_name}.gsa_codes", layer.num_kv_heads, weight.shape[-1],
            vllm_config.cache_config.block_size, vllm_config.compilation_config.static_forward_context,
        )
    layer.gsa = GSALayer(index, policy, source, kwargs, weight, codes)
    logger.debug("GSA layer %s: %s (selection of layer %d)", layer.layer_name, policy, source)


def layer_counts(worker) -> dict:
    """{layer name: {counter: value}} of this worker's GSA layers; for LLM.collective_rpc."""
    from .backend import COUNTERS

    context = worker.vllm_config.compilation_config.static_forward_context
    counts = {}
    for name, layer in context.items():
        gsa = getattr(layer, "gsa", None)
        if gsa is not None:
            counts[name] = dict(zip(COUNTERS, gsa.counts.tolist()))
    return counts
