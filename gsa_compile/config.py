"""GSAConfig: every key of the UCM GSA config format, live, validated, JSON round-tripping.

Its keys keep their names and meaning (see docs/config.md); gsa-compile adds a cpu
threshold pair, a token budget alternative to ratios, the selection scope, key-norm weighting
and the seed of random hash weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from .errors import GSAConfigError

logger = logging.getLogger(__name__)

REPRE_METHODS = ("max", "min", "sum")
HASH_WEIGHT_TYPES = ("random", "fixed")
SELECTION_SCOPES = ("per_head", "shared")
DEVICE_KINDS = ("cpu", "gpu", "npu")
LAYER_POLICIES = ("dense", "sparse", "reuse")
# List fields and what their entries are.
LIST_FIELDS = {
    "top_k_ratio_per_layer": "one ratio per layer, e.g. [0.3] * num_hidden_layers",
    "top_k_index_reuse": "one entry per layer: -1 or an earlier layer's index",
    "must_select_blocks": "block indices, e.g. [0, -2, -1], or [] for none",
}

# The UCM GSA config format's default layer policy: the first two and last three layers stay dense.
DEFAULT_DENSE_FIRST = 2
DEFAULT_DENSE_LAST = 3
DEFAULT_SPARSE_RATIO = 0.3


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class GSAConfig:
    """Configuration of GSA for one model. Field names follow the UCM GSA config format's JSON keys."""

    model_name: str = "custom"
    is_mla: bool = False
    hash_weight_type: str = "random"
    num_hidden_layers: int = 1
    gpu_seq_len_threshold: int = 2048
    gpu_concurrency_threshold: int = 1
    npu_seq_len_threshold: int = 2048
    npu_concurrency_threshold: int = 1
    chunk_size: int = 128
    chunk_repre_method: str = "max"
    head_dim: int = 128
    hash_bits: int = 128
    top_k_ratio_per_layer: Optional[list] = None
    top_k_index_reuse: Optional[list] = None
    must_select_blocks: list = field(default_factory=lambda: [0, -2, -1])
    hash_weight: Optional[str] = None
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    hash_bits_kv_lora: Optional[int] = None
    hash_bits_qk_rope: Optional[int] = None
    hash_weight_kv_lora: Optional[str] = None
    hash_weight_qk_rope: Optional[str] = None
    # Keys gsa-compile adds to the UCM GSA config format's.
    cpu_seq_len_threshold: int = 2048
    cpu_concurrency_threshold: int = 1
    budget_tokens: Optional[int] = None
    selection_scope: str = "per_head"
    key_norm_weighting: bool = False
    hash_seed: int = 0
    # Where relative hash-weight paths are resolved from (the JSON file's folder); not saved.
    source_dir: Optional[str] = field(default=None, compare=False, repr=False)

    def __new__(cls, *args, **kwargs):
        # Every construction (GSAConfig(...), from_dict, for_model's overrides) names unknown
        # keys the same way, instead of the dataclass's bare TypeError.
        _check_keys(kwargs, [f.name for f in dataclasses.fields(cls)])
        return super().__new__(cls)

    def __post_init__(self):
        _check_int("num_hidden_layers", self.num_hidden_layers, minimum=1)
        if self.top_k_ratio_per_layer is None:
            self.top_k_ratio_per_layer = default_ratios(self.num_hidden_layers)
        if self.top_k_index_reuse is None:
            self.top_k_index_reuse = [-1] * self.num_hidden_layers
        for name in LIST_FIELDS:
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise GSAConfigError naming the first field that is out of its allowed values.

        Runs at construction and again on first use after any field changed (fields may be
        assigned, lists edited in place): every method that reads the config checks first."""
        _check_int("num_hidden_layers", self.num_hidden_layers, minimum=1)
        for name in LIST_FIELDS:
            if not isinstance(getattr(self, name), list):
                raise GSAConfigError(
                    f"{name} must be a list ({LIST_FIELDS[name]}), got {getattr(self, name)!r}"
                )
        _check_type("model_name", self.model_name, str)
        for name in ("is_mla", "key_norm_weighting"):
            _check_type(name, getattr(self, name), bool)
        _check_choice("hash_weight_type", self.hash_weight_type, HASH_WEIGHT_TYPES)
        _check_choice("chunk_repre_method", self.chunk_repre_method, REPRE_METHODS)
        _check_choice("selection_scope", self.selection_scope, SELECTION_SCOPES)
        for kind in DEVICE_KINDS:
            for what in ("seq_len", "concurrency"):
                name = f"{kind}_{what}_threshold"
                _check_int(name, getattr(self, name), minimum=0)
        _check_int("chunk_size", self.chunk_size, minimum=1)
        _check_int("head_dim", self.head_dim, minimum=1)
        _check_bits("hash_bits", self.hash_bits)
        _check_int("hash_seed", self.hash_seed, minimum=0)
        if self.budget_tokens is not None:
            _check_int("budget_tokens", self.budget_tokens, minimum=1)
        for name in ("hash_weight", "hash_weight_kv_lora", "hash_weight_qk_rope"):
            value = getattr(self, name)
            if value is not None:
                _check_type(name, value, str)
        self._validate_must_select()
        self._validate_layers()
        self._validate_mla()
        self._validate_hash_weight_source()
        object.__setattr__(self, "_validated_state", self._state())
        # What is derived from the fields, per state: attention calls read it on every decode step.
        object.__setattr__(self, "_derived", {})

    def _state(self) -> tuple:
        values = self.__dict__
        return tuple(tuple(value) if isinstance(value, list) else value
                     for value in map(values.__getitem__, _FIELD_NAMES))

    def _ensure_valid(self) -> None:
        if self.__dict__.get("_validated_state") != self._state():
            self.validate()

    def check_key_dim(self, layer: int, key_dim: int) -> None:
        """Refuse a site whose keys do not have head_dim dims (the hash weights of the config
        are made for head_dim). MLA configs describe latent keys, which routes expand into
        keys of another width, so they are checked through qk_rope_head_dim instead."""
        self._ensure_valid()
        if self.is_mla:
            if key_dim <= self.qk_rope_head_dim:
                raise GSAConfigError(
                    f"layer {layer}: keys have {key_dim} dims, no more than qk_rope_head_dim="
                    f"{self.qk_rope_head_dim}; the config is made for another model"
                )
            return
        if key_dim != self.head_dim:
            raise GSAConfigError(
                f"head_dim={self.head_dim} but layer {layer}'s keys have {key_dim} dims; set "
                f"head_dim={key_dim} (GSAConfig.for_model(model) derives it) or use a config made "
                f"for this model"
            )

    def _validate_must_select(self) -> None:
        if not isinstance(self.must_select_blocks, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in self.must_select_blocks
        ):
            raise GSAConfigError(
                "must_select_blocks must be a list of integers (non-negative counts from the "
                f"start, negative from the end), got {self.must_select_blocks!r}"
            )
        if self.budget_tokens is not None:
            budget_blocks = _ceil_div(self.budget_tokens, self.chunk_size)
            distinct = len(set(self.must_select_blocks))
            if budget_blocks < distinct:
                raise GSAConfigError(
                    f"must_select_blocks {self.must_select_blocks} needs {distinct} blocks but "
                    f"budget_tokens={self.budget_tokens} with chunk_size={self.chunk_size} allows "
                    f"only {budget_blocks}; raise budget_tokens to at least "
                    f"{distinct * self.chunk_size} or select fewer blocks"
                )

    def _validate_layers(self) -> None:
        n = self.num_hidden_layers
        for name in ("top_k_ratio_per_layer", "top_k_index_reuse"):
            values = getattr(self, name)
            if len(values) != n:
                raise GSAConfigError(
                    f"{name} has {len(values)} entries but num_hidden_layers is {n}; "
                    f"give exactly one entry per layer"
                )
        for layer, ratio in enumerate(self.top_k_ratio_per_layer):
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
                raise GSAConfigError(
                    f"top_k_ratio_per_layer[{layer}] = {ratio!r}: must be a number > 0 "
                    f"(a ratio >= 1 keeps the layer dense)"
                )
        for layer, source in enumerate(self.top_k_index_reuse):
            if isinstance(source, bool) or not isinstance(source, int):
                raise GSAConfigError(
                    f"top_k_index_reuse[{layer}] = {source!r}: must be an integer "
                    f"(-1 computes, j < {layer} reuses layer j's selection)"
                )
            if source == -1:
                continue
            if not 0 <= source < layer:
                raise GSAConfigError(
                    f"top_k_index_reuse[{layer}] = {source}: a layer can reuse only an earlier "
                    f"layer (0 <= j < {layer}) or compute its own (-1)"
                )
            if self.top_k_ratio_per_layer[layer] >= 1:
                raise GSAConfigError(
                    f"top_k_index_reuse[{layer}] = {source} but layer {layer} is dense "
                    f"(top_k_ratio_per_layer[{layer}] = {self.top_k_ratio_per_layer[layer]}); "
                    f"only sparse layers (ratio < 1) can reuse a selection"
                )
            if self._policy(source) != "sparse":
                raise GSAConfigError(
                    f"top_k_index_reuse[{layer}] = {source} but layer {source} is "
                    f"{self._policy(source)}; a reused layer must compute its own sparse "
                    f"selection (ratio < 1 and top_k_index_reuse = -1)"
                )

    def _validate_mla(self) -> None:
        mla_fields = ("kv_lora_rank", "qk_rope_head_dim", "hash_bits_kv_lora", "hash_bits_qk_rope")
        if not self.is_mla:
            return
        for name in mla_fields:
            value = getattr(self, name)
            if value is None:
                raise GSAConfigError(f"is_mla is true, so {name} must be set (a positive integer)")
            _check_int(name, value, minimum=1)
        _check_bits("hash_bits_kv_lora", self.hash_bits_kv_lora)
        _check_bits("hash_bits_qk_rope", self.hash_bits_qk_rope)
        if self.head_dim != self.kv_lora_rank + self.qk_rope_head_dim:
            raise GSAConfigError(
                f"is_mla is true, so head_dim ({self.head_dim}) must equal kv_lora_rank + "
                f"qk_rope_head_dim ({self.kv_lora_rank} + {self.qk_rope_head_dim}): the latent key layout"
            )
        if self.hash_bits != self.hash_bits_kv_lora + self.hash_bits_qk_rope:
            raise GSAConfigError(
                f"is_mla is true, so hash_bits ({self.hash_bits}) must equal hash_bits_kv_lora + "
                f"hash_bits_qk_rope ({self.hash_bits_kv_lora} + {self.hash_bits_qk_rope})"
            )

    def _validate_hash_weight_source(self) -> None:
        if self.hash_weight_type != "fixed":
            return
        needed = ("hash_weight_kv_lora", "hash_weight_qk_rope") if self.is_mla else ("hash_weight",)
        for name in needed:
            if getattr(self, name) is None:
                raise GSAConfigError(
                    f"hash_weight_type is 'fixed', so {name} must name a safetensors file of "
                    f"trained hash weights (gsa-compile calibrate writes one)"
                )

    # ------------------------------------------------------------------ policy
    def layer_policy(self, layer: int) -> str:
        """'dense' (ratio >= 1), 'reuse' (reads another layer's selection) or 'sparse'."""
        self._ensure_valid()
        return self._policy(layer)

    def _policy(self, layer: int) -> str:
        self._check_layer(layer)
        if self.top_k_ratio_per_layer[layer] >= 1:
            return "dense"
        if self.top_k_index_reuse[layer] != -1:
            return "reuse"
        return "sparse"

    def selection_source(self, layer: int) -> int:
        """The layer whose selection `layer` uses: itself unless it reuses another's."""
        self._ensure_valid()
        self._check_layer(layer)
        source = self.top_k_index_reuse[layer]
        return layer if source == -1 else source

    def num_selected_blocks(self, layer: int, num_keys: int) -> int:
        """k for `layer` with `num_keys` keys in the cache (docs/semantics.md, rule 5)."""
        from .kernels.common import num_selected_blocks

        kwargs = self.attention_kwargs(layer, "cpu")
        return num_selected_blocks(
            num_keys, self.chunk_size, top_k_ratio=kwargs["top_k_ratio"],
            budget_tokens=kwargs["budget_tokens"], must_select=self.must_select_blocks,
        )

    def attention_kwargs(self, layer: int, device_type: str) -> dict[str, Any]:
        """Keyword arguments of gsa::attention / functional.gsa_attention for a sparse or reuse
        layer on a device type: budget of the layer's selection source, blocks, thresholds.
        Made once per layer, device type and state of the fields; each call gets its own copy."""
        self._ensure_valid()
        derived = self.__dict__.setdefault("_derived", {})  # absent in a config unpickled from before
        key = ("attention_kwargs", layer, device_type)
        if key not in derived:
            derived[key] = self._attention_kwargs(layer, device_type)
        kwargs = derived[key]
        return {**kwargs, "must_select": list(kwargs["must_select"])}

    def _attention_kwargs(self, layer: int, device_type: str) -> dict[str, Any]:
        if self._policy(layer) == "dense":
            raise GSAConfigError(f"layer {layer} is dense (top_k_ratio_per_layer[{layer}] >= 1); it has no GSA site")
        seq_len, concurrency = self.thresholds(device_type)
        budget = {"top_k_ratio": None, "budget_tokens": self.budget_tokens}
        if self.budget_tokens is None:
            budget["top_k_ratio"] = float(self.top_k_ratio_per_layer[self.selection_source(layer)])
        return {
            "chunk_size": self.chunk_size,
            **budget,
            "must_select": list(self.must_select_blocks),
            "repre": self.chunk_repre_method,
            "scope": self.selection_scope,
            "seq_len_threshold": seq_len,
            "concurrency_threshold": concurrency,
        }

    def thresholds(self, device_type: str) -> tuple[int, int]:
        """(seq_len_threshold, concurrency_threshold) for a torch device type."""
        self._ensure_valid()
        kind = {"cuda": "gpu", "npu": "npu", "privateuseone": "npu"}.get(device_type, "cpu")
        return (
            getattr(self, f"{kind}_seq_len_threshold"),
            getattr(self, f"{kind}_concurrency_threshold"),
        )

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_hidden_layers:
            raise GSAConfigError(
                f"layer {layer} is outside this config's {self.num_hidden_layers} layers "
                f"(0..{self.num_hidden_layers - 1})"
            )

    # ------------------------------------------------------------------ hash weights
    def resolve_path(self, path: str) -> str:
        if os.path.isabs(path) or self.source_dir is None:
            return path
        return os.path.join(self.source_dir, path)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source_dir"}

    def to_json(self) -> str:
        self._ensure_valid()
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str) -> None:
        with open(path, "w") as handle:
            handle.write(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source_dir: Optional[str] = None) -> "GSAConfig":
        if not isinstance(data, dict):
            raise GSAConfigError(f"a GSA config must be a JSON object, got {type(data).__name__}")
        _check_keys(data, [f.name for f in dataclasses.fields(cls) if f.name != "source_dir"])
        return cls(**data, source_dir=source_dir)

    @classmethod
    def load(cls, path: str) -> "GSAConfig":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise GSAConfigError(f"{path} is not valid JSON: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise GSAConfigError(f"{path} is not UTF-8 text (a GSA config is a UTF-8 JSON file): {exc}") from exc
        except OSError as exc:
            raise GSAConfigError(f"cannot read GSA config {path}: {exc.strerror or exc}") from exc
        try:
            return cls.from_dict(data, source_dir=os.path.dirname(os.path.abspath(path)))
        except GSAConfigError as exc:
            raise GSAConfigError(f"GSA config {path}: {exc}") from exc

    def replace(self, **changes) -> "GSAConfig":
        """A copy with some fields changed; per-layer lists are re-derived when the depth changes."""
        data = self.to_dict()
        if "num_hidden_layers" in changes and changes["num_hidden_layers"] != self.num_hidden_layers:
            data["top_k_ratio_per_layer"] = None
            data["top_k_index_reuse"] = None
        data.update(changes)
        return type(self)(**data, source_dir=self.source_dir)

    # ------------------------------------------------------------------ derivation
    @classmethod
    def for_model(cls, model_or_config: Any, *example_args: Any, **kwargs: Any) -> "GSAConfig":
        """Derive a config (layers, head dim, MLA dims) for a model with the UCM GSA config format's default policy.

        With example inputs (`for_model(model, *example_args, **example_kwargs)`), the model is
        captured on them once (gsa_compile.inspect: nothing is rewritten) and the config is sized
        from the attention sites of its graph: num_hidden_layers is one past the highest layer
        id (the model's own layer index, or the site count in graph order), head_dim that of the
        sites' keys. This works for any nn.Module, hand-written attention included. Without
        inputs, it reads a transformers model or config, or a plain nn.Module's attention
        modules (nn.MultiheadAttention or modules with num_heads/head_dim).
        Keyword arguments that are GSAConfig fields override the derived values (e.g.
        budget_tokens=2048); with example inputs, the others are example keyword inputs of the
        model; without, they are refused as unknown config keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        overrides = {name: value for name, value in kwargs.items() if name in names}
        example_kwargs = {name: value for name, value in kwargs.items() if name not in names}
        if not example_args and example_kwargs:
            cls(**kwargs)  # names the unknown keys and the allowed ones, as the JSON path does
        if example_args:
            derived = _derive_from_graph(model_or_config, example_args, example_kwargs)
        else:
            derived = _derive_from_transformers(model_or_config)
            if derived is None:
                derived = _derive_from_module(model_or_config)
        derived.update(overrides)
        return cls(**derived)


# In the order _state compares them.
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GSAConfig))


def default_ratios(num_layers: int, sparse_ratio: float = DEFAULT_SPARSE_RATIO) -> list:
    """The UCM GSA config format's default policy: first two and last three layers dense, `sparse_ratio` elsewhere."""
    ratios = [sparse_ratio] * num_layers
    dense = set(range(min(DEFAULT_DENSE_FIRST, num_layers)))
    dense |= set(range(max(0, num_layers - DEFAULT_DENSE_LAST), num_layers))
    if len(dense) >= num_layers:
        # A model this shallow would have no sparse layer at all: keep only layer 0 dense.
        dense = {0} if num_layers > 1 else set()
    for layer in dense:
        ratios[layer] = 1
    return ratios


def _round_bits(dim: int) -> int:
    return max(8, 8 * _ceil_div(dim, 8))


def _derive_from_transformers(obj: Any) -> Optional[dict]:
    config = getattr(obj, "config", obj)
    if not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    # Encoder-decoder families decode (and cache) with their decoder's layers only.
    layers = config_attribute(config, "decoder_layers") or config_attribute(config, "num_hidden_layers")
    heads = config_attribute(config, "decoder_attention_heads") or config_attribute(config, "num_attention_heads")
    if layers is None or heads is None:
        raise GSAConfigError(
            f"cannot derive a GSA config from transformers config {type(config).__name__}: "
            f"it has no num_hidden_layers/num_attention_heads"
        )
    derived: dict[str, Any] = {
        "model_name": getattr(config, "_name_or_path", "") or config.model_type,
        "num_hidden_layers": int(layers),
    }
    kv_lora_rank = config_attribute(config, "kv_lora_rank")
    if kv_lora_rank:
        rope = int(config_attribute(config, "qk_rope_head_dim"))
        derived.update(
            is_mla=True, kv_lora_rank=int(kv_lora_rank), qk_rope_head_dim=rope,
            head_dim=int(kv_lora_rank) + rope, hash_bits_kv_lora=_round_bits(kv_lora_rank),
            hash_bits_qk_rope=_round_bits(rope),
        )
        derived["hash_bits"] = derived["hash_bits_kv_lora"] + derived["hash_bits_qk_rope"]
        return derived
    head_dim = config_attribute(config, "head_dim") or config.hidden_size // heads
    derived.update(head_dim=int(head_dim), hash_bits=_round_bits(int(head_dim)))
    return derived


def _derive_from_graph(model: Any, example_args: tuple, example_kwargs: dict) -> dict:
    import torch.nn as nn

    from .api import inspect

    if not isinstance(model, nn.Module):
        raise GSAConfigError(
            f"GSAConfig.for_model with example inputs takes the nn.Module to run on them, got {type(model).__name__}"
        )
    report = inspect(model, *example_args, **example_kwargs)
    if not report.sites:
        unmatched = "; ".join(f"{item.location}: {item.reason}" for item in report.unmatched) or "none"
        raise GSAConfigError(
            f"the graph of {type(model).__name__} on the example inputs has no attention site to size a config "
            f"from (candidates left dense: {unmatched})"
        )
    layers = max(site.layer for site in report.sites) + 1
    head_dims = sorted({site.head_dim for site in report.sites})
    try:
        derived = _derive_from_transformers(model) or {}
    except GSAConfigError:  # a transformers config without the usual sizes: the graph has them
        derived = {}
    if derived.get("is_mla"):
        # MLA dims come from the model's config; the graph gives the depth.
        return {**derived, "num_hidden_layers": layers}
    if len(head_dims) > 1:
        logger.info("GSA: sites of %s have key dims %s; head_dim (the default hash_bits) follows the largest",
                    type(model).__name__, head_dims)
    return {
        "model_name": derived.get("model_name") or type(model).__name__,
        "num_hidden_layers": layers,
        "head_dim": head_dims[-1],
        "hash_bits": _round_bits(head_dims[-1]),
    }


def config_attribute(config: Any, name: str) -> Any:
    """A transformers config attribute (None when missing). A config whose layers differ (e.g.
    Gemma 4's per-layer head dims) refuses global reads of per-layer attributes: then the
    largest value over its layers, which every layer's hash bits can be sized from."""
    try:
        return getattr(config, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        values = [getattr(layer, name, None) for layer in config.per_layer_config]
        values = [value for value in values if value is not None]
        return max(values) if values else None


def _derive_from_module(module: Any) -> dict:
    import torch.nn as nn

    if not isinstance(module, nn.Module):
        raise GSAConfigError(
            f"GSAConfig.for_model takes a transformers model or config or an nn.Module, "
            f"got {type(module).__name__}"
        )
    head_dims = []
    for sub in module.modules():
        if isinstance(sub, nn.MultiheadAttention):
            head_dims.append(sub.head_dim)
        elif type(sub).__name__.lower().endswith("attention"):
            head_dim = getattr(sub, "head_dim", None)
            heads = getattr(sub, "num_heads", None) or getattr(sub, "n_heads", None)
            width = getattr(sub, "embed_dim", None) or getattr(sub, "hidden_size", None)
            if head_dim is None and heads and width:
                head_dim = width // heads
            if head_dim is not None:
                head_dims.append(int(head_dim))
    if not head_dims:
        raise GSAConfigError(
            f"found no attention module in {type(module).__name__} to size a config from; "
            f"pass example inputs (GSAConfig.for_model(model, *example_inputs) sizes one from the captured "
            f"graph), build one with GSAConfig(num_hidden_layers=..., head_dim=...), or let "
            f"gsa_compile.optimize number the attention sites it finds"
        )
    return {
        "model_name": type(module).__name__,
        "num_hidden_layers": len(head_dims),
        "head_dim": head_dims[0],
        "hash_bits": _round_bits(head_dims[0]),
    }


def _check_keys(data: dict, allowed: list) -> None:
    unknown = sorted(str(key) for key in set(data) - set(allowed))
    if unknown:
        raise GSAConfigError(f"unknown config key(s) {unknown}; allowed keys: {allowed}")


def _check_type(name: str, value: Any, kind: type) -> None:
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise GSAConfigError(f"{name} must be of type {kind.__name__}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    _check_type(name, value, int)
    if value < minimum:
        raise GSAConfigError(f"{name} must be an integer >= {minimum}, got {value}")


def _check_bits(name: str, value: Any) -> None:
    _check_int(name, value, minimum=8)
    if value % 8:
        raise GSAConfigError(f"{name} must be a positive multiple of 8 (codes are packed in bytes), got {value}")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise GSAConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


# ---------------------------------------------------------------------- shipped configs
def shipped_config_names() -> list[str]:
    """Model names of the configs shipped as package data."""
    return sorted(_shipped_index())


def load_config(name_or_path: str) -> GSAConfig:
    """A shipped config by model name (e.g. "Qwen/Qwen3-4B") or a JSON file path."""
    if os.path.isfile(name_or_path):
        return GSAConfig.load(name_or_path)
    index = _shipped_index()
    if name_or_path not in index:
        raise GSAConfigError(
            f"no shipped GSA config named {name_or_path!r} and no such file; shipped: "
            f"{sorted(index)}"
        )
    with resources.as_file(resources.files("gsa_compile") / "configs" / index[name_or_path]) as path:
        return GSAConfig.load(str(path))


def _shipped_index() -> dict[str, str]:
    index = {}
    for entry in (resources.files("gsa_compile") / "configs").iterdir():
        if entry.name.endswith(".json"):
            index[json.loads(entry.read_text())["model_name"]] = entry.name
    return index
