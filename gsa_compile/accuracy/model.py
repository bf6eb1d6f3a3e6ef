"""The project's own long-context accuracy models.

Small ``transformers`` ``LlamaForCausalLM`` configurations over the token layout of
:mod:`gsa_compile.accuracy.tasks`, by name (:data:`MODEL_CONFIGS`):

- ``"default"``, the shipped model: GQA with 8 query heads and 2 KV heads of dim 64 (so
  GSA's grouping, 64-dim codes and 128-token chunking all get exercised), RoPE with theta
  500000 for contexts up to 16K, 6 layers, hidden 256, tied embeddings.  The weights trained
  by ``benchmarks/accuracy/train_accuracy_model.py`` ship as package data in
  ``gsa_compile/assets/accuracy_model/`` (``config.json`` + ``model.safetensors``, stored
  in bfloat16).
- ``"geometry128"``: the attention geometry of current LLMs (head dim 128, 8 query / 2 KV
  heads, 12 layers, RoPE theta 500000) on a narrow residual stream (hidden 256, attention
  width 1024 through ``head_dim``), so that it stays near 29 MiB in bfloat16; its vocabulary
  adds the 256 byte tokens of :mod:`gsa_compile.accuracy.text` (768 ids) for the
  natural-text signal it is trained on besides the tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import tasks, text

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "accuracy_model"

DEFAULT_CONFIG = dict(
    vocab_size=tasks.VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=tasks.BOS,
    eos_token_id=tasks.EOS,
    pad_token_id=tasks.PAD,
)

# The shipped model's widths with LLM attention geometry: head dim 128 (attention 1024 wide over
# a 256-wide residual), 12 layers, and the byte tokens of the text signal.
GEOMETRY128_CONFIG = dict(DEFAULT_CONFIG, vocab_size=text.TEXT_VOCAB_SIZE, num_hidden_layers=12, head_dim=128)

MODEL_CONFIGS = {"default": DEFAULT_CONFIG, "geometry128": GEOMETRY128_CONFIG}


def accuracy_model_config(name: str = "default", **overrides):
    """The ``LlamaConfig`` of the accuracy model ``name`` (a key of :data:`MODEL_CONFIGS`);
    keyword arguments override fields."""
    from transformers import LlamaConfig

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown accuracy model {name!r}; allowed: {sorted(MODEL_CONFIGS)}")
    kw = dict(MODEL_CONFIGS[name])
    kw.update(overrides)
    theta = kw.pop("rope_theta")
    cfg = LlamaConfig(**kw)
    # transformers >= 5 keeps RoPE settings in rope_parameters, older ones in rope_theta
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = float(theta)
        rp.setdefault("rope_type", "default")
    else:
        cfg.rope_theta = float(theta)
    return cfg


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(cfg.rope_theta)


def build_accuracy_model(config=None, *, name: str = "default", attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A freshly initialised (seeded) accuracy model ``name``, for training."""
    from transformers import LlamaForCausalLM

    cfg = config if config is not None else accuracy_model_config(name, **overrides)
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tasks.PAD
    model.generation_config.bos_token_id = tasks.BOS
    model.generation_config.eos_token_id = tasks.EOS
    return model


def save_accuracy_model(
    model, path: str | Path = ASSET_DIR, *, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "50GB",
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (in ``dtype``) to ``path``; a model
    larger than ``max_shard_size`` is written as shards with their index
    (``model.safetensors.index.json``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("model*.safetensors*"):  # shards of an earlier save would mix with these
        old.unlink()
    orig = next(model.parameters()).dtype
    model.to(dtype)
    try:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    finally:
        model.to(orig)
    for extra in ("generation_config.json",):
        (path / extra).unlink(missing_ok=True)
    return path


def has_weights(path: str | Path) -> bool:
    """Whether ``path`` holds saved weights (one file or shards with their index)."""
    path = Path(path)
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def load_accuracy_model(
    path: str | Path | None = None,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load the committed accuracy model (or the one at ``path``) in eval mode."""
    from transformers import LlamaForCausalLM

    path = Path(path) if path is not None else ASSET_DIR
    if not has_weights(path):
        raise FileNotFoundError(
            f"no accuracy model weights at {path}; train them with "
            "benchmarks/accuracy/train_accuracy_model.py"
        )
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = tasks.PAD
    model.generation_config.bos_token_id = tasks.BOS
    model.generation_config.eos_token_id = tasks.EOS
    logger.info(
        "loaded accuracy model from %s (%d layers, rope theta %g, attn %s)",
        path, model.config.num_hidden_layers, _rope_theta(model.config), attn_implementation,
    )
    return model.to(device).eval()
