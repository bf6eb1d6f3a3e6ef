"""GSA sites of a transformers model: one `GSASite` child module per attention module.

A site holds what its attention calls need and nothing the model computes: the layer's policy
(after the model's own constraints, e.g. sliding-window layers stay dense), its hash weight
(a float32 buffer, so `model.to(...)` moves it without rounding it), the original attention
function for the dense path and counters. Nothing of a single call lives on it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re
import sys
from collections import Counter
from typing import Callable, Optional

import torch
from torch import nn

from .. import functional
from ..config import GSAConfig, config_attribute
from ..decode import DENSE_REASONS
from ..errors import GSAConfigError, GSAError
from ..hashing import layer_hash_weight
from ..mla import latent_keys
from ..sharding import HeadShard, row_shard

logger = logging.getLogger(__name__)

SITE_ATTRIBUTE = "gsa_site"


# What a site counts, in the order of its counters.
COUNTED = ("encoded_tokens", "sparse_calls", "dense_calls", "dense_kv_bytes", "sparse_kv_bytes", "code_bytes")
REASON_SLOTS = {reason: len(COUNTED) + i for i, reason in enumerate(DENSE_REASONS)}


def _device_count_table() -> list:
    """Counter slot -> what it takes of DecodePlan.device_counts() (sparse, dense as short,
    dense as concurrency)."""
    table = [[0, 0, 0] for _ in range(len(COUNTED) + len(REASON_SLOTS))]
    table[COUNTED.index("sparse_calls")][0] = 1
    table[COUNTED.index("dense_calls")][1] = table[COUNTED.index("dense_calls")][2] = 1
    table[REASON_SLOTS["short"]][1] = 1
    table[REASON_SLOTS["concurrency"]][2] = 1
    return table


DEVICE_COUNT_TABLE = _device_count_table()


def device_count_increment(counts: torch.Tensor) -> torch.Tensor:
    """int64 [slots]: what a call decided on the device adds to its site's counters, from the
    plan's device_counts(); made once per step, added by each layer in one kernel."""
    table = torch.tensor(DEVICE_COUNT_TABLE, dtype=torch.int64, device=counts.device)
    return (table * counts).sum(-1)


@dataclasses.dataclass
class SiteStats:
    """What a site did since the last reset. Token counts are positions (batch rows and heads
    not multiplied in) except `*_bytes`, which count every row and head. dense_reasons maps a
    gsa_compile.decode.DENSE_REASONS key to its count."""

    encoded_tokens: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    # Filled only while the runtime collects stats.
    dense_kv_bytes: int = 0  # K and V bytes a dense decode call reads
    sparse_kv_bytes: int = 0  # K and V bytes of the selected blocks a sparse call reads
    code_bytes: int = 0  # codes a selecting call reads
    dense_reasons: Counter = dataclasses.field(default_factory=Counter)

    @classmethod
    def from_counts(cls, counts: list) -> "SiteStats":
        stats = cls(**dict(zip(COUNTED, counts)))
        stats.dense_reasons = Counter({reason: counts[slot] for reason, slot in REASON_SLOTS.items() if counts[slot]})
        return stats


@dataclasses.dataclass
class SiteShape:
    """How keys look when they reach the attention function (what the hash weight is sized for).
    Under tensor parallelism the heads are this rank's and `shard` says which of the model's."""

    query_heads: int
    kv_heads: int
    key_dim: int
    shard: Optional[HeadShard] = None


class GSARuntime:
    """What the sites of one optimized model share (a plain object, not a module): the config,
    read at every call (a changed config applies to the next call), and the sites."""

    def __init__(self, config: GSAConfig, original_implementation: str, implementation: str):
        self.config = config
        self.original_implementation = original_implementation
        self.implementation = implementation
        self.sites: dict[int, GSASite] = {}
        self.enabled = True
        self.collect_stats = False
        # Whether the model's forward passes keyword arguments down (set by optimize_transformers).
        self.forward_takes_kwargs = True

    def computing_sites(self) -> list["GSASite"]:
        """Sites that select their own blocks, hence keep codes in the cache."""
        return [site for site in self.sites.values() if site.policy == "sparse"]

    def reset_stats(self) -> None:
        for site in self.sites.values():
            site.reset_stats()

    def total_stats(self) -> SiteStats:
        total = [0] * (len(COUNTED) + len(REASON_SLOTS))
        for site in self.sites.values():
            total = [a + b for a, b in zip(total, site.counts())]
        return SiteStats.from_counts(total)


class _SiteRef:
    """How a cache layer points at its site. Copying a cache (generate does for some modes)
    must not copy the model's site, so deepcopy keeps the reference."""

    def __init__(self, site: "GSASite"):
        self.site = site

    def __deepcopy__(self, memo):
        # A copy of the whole model copies its sites: the copied cache points at those.
        copied = memo.get(id(self.site))
        return self if copied is None else _SiteRef(copied)


class GSASite(nn.Module):
    """One attention module's GSA site. It holds no per-call state: the codes of a call come
    from the call's cache and a reused selection from the call's DecodeStep (hf_attention), so
    threads and copies of the model never see each other's calls.

    Counters: eager calls decided on the host count in Python; compiled calls and calls decided
    on the device count in an int64 buffer on the device (so CUDA-graph replays count too, and no
    counter is a value dynamo would guard on). `stats` adds both up (reading the device)."""

    def __init__(
        self,
        runtime: GSARuntime,
        layer: int,
        policy: str,
        shape: SiteShape,
        dense_fn: Callable,
        key_builder: Optional[Callable] = None,
        note: str = "",
        latent=None,
    ):
        super().__init__()
        self.runtime = runtime
        self.layer = layer
        self.policy = policy
        self.shape = shape
        self.dense_fn = dense_fn
        # MLA caches latents: the keys attention sees are built from them (module.expand_kv).
        self.key_builder = key_builder
        # MLA selecting in the latent space (gsa_compile.mla.LatentLayout): the codes are those of
        # the cached latents [c_kv | k_rope], one KV head shared by all query heads.
        self.latent = latent
        self.note = note
        self.ref = _SiteRef(self)
        self._host_counts = [0] * (len(COUNTED) + len(REASON_SLOTS))
        self.register_buffer("counters", torch.zeros(len(self._host_counts), dtype=torch.int64), persistent=False)
        weight = None
        if policy == "sparse":
            if latent is not None:
                # One latent KV head for all query heads (gsa_compile.mla).
                weight = layer_hash_weight(runtime.config, layer, 1, latent.code_dim)
            else:
                weight = layer_hash_weight(runtime.config, layer, shape.kv_heads, shape.key_dim, shape.shard)
            weight = weight.to(torch.float32)
        self.register_buffer("hash_weight", weight, persistent=False)
        _mark_static(self.counters)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, policy={self.policy!r}"

    def _apply(self, fn, recurse=True):
        # Hash weights stay float32 whatever dtype the model is cast to: codes must not depend
        # on the model's dtype. Only the device follows (the counters stay int64).
        device = fn(self.counters.to(torch.float32)).device
        if self.hash_weight is not None:
            self.hash_weight = self.hash_weight.to(device)
        if self.counters.device != device:
            self.counters = self.counters.to(device)
            _mark_static(self.counters)
        return self

    # ------------------------------------------------------------------ counting
    def count(self, name: str, amount=1) -> None:
        """Add `amount` (an int, or a tensor computed on the device) to a counter: a COUNTED
        name or a DENSE_REASONS key (which also counts a dense call)."""
        slot = REASON_SLOTS.get(name, None)
        slots = [COUNTED.index("dense_calls"), slot] if slot is not None else [COUNTED.index(name)]
        if isinstance(amount, torch.Tensor) or torch.compiler.is_compiling():
            for index in slots:
                self.counters[index] += amount
        else:
            for index in slots:
                self._host_counts[index] += amount

    def add_counts(self, increment: torch.Tensor) -> None:
        """Add an int64 [slots] device tensor (device_count_increment) to the counters."""
        self.counters.add_(increment)

    def counts(self) -> list:
        return [host + device for host, device in zip(self._host_counts, self.counters.tolist())]

    @property
    def stats(self) -> SiteStats:
        return SiteStats.from_counts(self.counts())

    def reset_stats(self) -> None:
        self._host_counts = [0] * len(self._host_counts)
        self.counters.zero_()

    # ------------------------------------------------------------------ codes
    def encode(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Codes (and key norms when configured) of keys entering the cache. The cache passes
        what it stores; for MLA that is latents, expanded here into the keys attention sees."""
        keys = self.hashed_keys(key_states, value_states)
        heads, dims = (1, self.latent.code_dim) if self.latent is not None else (self.shape.kv_heads, self.shape.key_dim)
        if tuple(keys.shape[1:2]) + tuple(keys.shape[3:]) != (heads, dims):
            raise GSAError(
                f"layer {self.layer}: keys entering the cache are {tuple(keys.shape)} but the GSA site was "
                f"sized for {heads} KV heads of {dims} dims"
            )
        self.count("encoded_tokens", keys.shape[2])
        norms = functional.key_norms(keys) if self.runtime.config.key_norm_weighting else None
        return functional.encode(keys, self.hash_weight), norms

    def hashed_keys(self, key_states: torch.Tensor, value_states: torch.Tensor) -> torch.Tensor:
        """What the codes hash, from what the cache stores: the keys, the keys expand_kv builds
        from MLA latents, or (latent-space selection) the latent keys [c_kv | k_rope]."""
        if self.latent is not None:
            return latent_keys(key_states, value_states)
        return key_states if self.key_builder is None else self.key_builder(key_states, value_states)[0]

    # ------------------------------------------------------------------ policy
    def attention_kwargs(self, device_type: str) -> dict:
        return self.runtime.config.attention_kwargs(self.layer, device_type)

    def source(self) -> "GSASite":
        """The site whose selection this one uses."""
        return self.runtime.sites[self.runtime.config.selection_source(self.layer)]


def _mark_static(t: torch.Tensor) -> None:
    # CUDA graphs replay counters in place: their address must not change between steps.
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)


# ---------------------------------------------------------------------- discovery
# Attribute names under which decoder layers hold their cross-attention (BART family, Whisper,
# BERT-style decoders); such modules attend encoder states, never the decoder's own cache.
CROSS_ATTENTION_NAMES = ("encoder_attn", "crossattention", "cross_attn", "cross_attention")
# What a modeling file's attention class reads to pick its attention function.
INTERFACE_MARKERS = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface")


@dataclasses.dataclass
class Discovered:
    """The attention modules of a transformers model, as the HF route sees them."""

    self_attention: list  # (path, module): attend the model's own cache, keyed by layer_idx
    cross_attention: list  # (path, module): attend encoder states; always dense
    not_routed: list  # paths of attention modules that do not call transformers' AttentionInterface


def calls_interface(module_class: type) -> bool:
    """Whether the class (or a transformers base class of it) picks its attention function
    through transformers' AttentionInterface: only such modules can be served by this route."""
    return _calls_interface(module_class)


@functools.lru_cache(maxsize=None)
def _calls_interface(module_class: type) -> bool:
    for cls in module_class.__mro__:
        if cls in (nn.Module, object) or not cls.__module__.startswith("transformers."):
            continue
        if any(marker in _class_source(cls) for marker in INTERFACE_MARKERS):
            return True
    return False


def passes_key_selection(module_class: type) -> bool:
    """Whether the class hands a key selection of its own (`indices=`, `block_indices=`, from
    a DSA-style indexer, its own or the layer's before) to its attention function."""
    return re.search(r"\b(block_)?indices=", _class_source(module_class)) is not None


def tiles_cached_heads(module_class: type) -> bool:
    """Whether the class tiles its cached keys along the head axis before attention
    (`key_states.repeat(1, r, 1, 1)`, JetMoE): key head j is then cached head j % Hkv."""
    return re.search(r"key_states\s*=\s*key_states\.repeat\(\s*1\s*,", _class_source(module_class)) is not None


@functools.lru_cache(maxsize=None)
def _class_source(module_class: type) -> str:
    """The class's source ("" where Python has none), read once per class."""
    try:
        return inspect.getsource(module_class)
    except (OSError, TypeError):
        return ""


def discover(model: nn.Module) -> Discovered:
    """Classify the attention modules of the decoder of `model` (in model order): a multimodal
    model's vision or audio encoders attend no cache and keep their attention."""
    found = Discovered([], [], [])
    for path, module in _decoder_modules(model):
        if isinstance(module, GSASite):
            continue
        if not calls_interface(type(module)):
            if type(module).__name__.endswith("Attention") and not any(
                calls_interface(type(child)) for child in module.modules()
            ):
                found.not_routed.append(path)
            continue
        if not isinstance(getattr(module, "layer_idx", None), int):
            continue
        (found.cross_attention if is_cross_attention(path, module) else found.self_attention).append((path, module))
    return found


def _decoder(model: nn.Module) -> Optional[nn.Module]:
    """The model's decoder (a transformers model of its own), or None: some models name their
    output head a decoder (ModernBERT-decoder's get_decoder is its LM head)."""
    from transformers import PreTrainedModel

    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    except Exception:  # a model whose get_decoder needs parts it lacks
        return None
    return decoder if isinstance(decoder, PreTrainedModel) else None


def _decoder_modules(model: nn.Module):
    """(path in `model`, module) of the modules of the model's decoder (get_decoder), or of
    the whole model when it names none."""
    decoder = _decoder(model)
    prefix = next((path for path, module in model.named_modules() if module is decoder), None)
    if prefix is None:
        return model.named_modules()
    return decoder.named_modules(prefix=prefix)


def attention_owner(model: nn.Module) -> nn.Module:
    """The model whose attention implementation GSA sets: the decoder, so that a multimodal
    model's encoders keep theirs (some accept no other, e.g. Gemma 4's audio encoder)."""
    decoder = _decoder(model)
    return model if decoder is None else decoder


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the self-attention modules that call transformers' attention
    interface, in model order."""
    return discover(model).self_attention


def is_cross_attention(path: str, module: nn.Module) -> bool:
    if getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__:
        return True
    return path.rsplit(".", 1)[-1] in CROSS_ATTENTION_NAMES


def model_config(module: nn.Module, fallback=None):
    """The (text) config an attention module was built from, or `fallback` (the model's)."""
    config = getattr(module, "config", None) or fallback
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _module_int(module: nn.Module, names: tuple) -> Optional[int]:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def site_shape(module: nn.Module, config=None) -> SiteShape:
    """Heads and key dims of the keys the attention function receives. The module's own
    attributes and key projection win over the config: they hold per-layer head dims and KV
    heads (Gemma 4), and a decoder's heads where the config names the encoder's (Whisper)."""
    config = model_config(module, config)
    declared_heads = _module_int(module, ("num_heads", "num_attention_heads", "n_heads", "n_head"))
    query_heads = declared_heads or int(config_attribute(config, "num_attention_heads"))
    if hasattr(module, "expand_kv"):
        # MLA in transformers expands latents into one key per query head.
        return tensor_parallel_shape(module, SiteShape(query_heads, query_heads, int(module.qk_head_dim)))
    key_dim = _module_int(module, ("head_dim", "head_size", "attention_head_size"))
    key_dim = int(key_dim or config_attribute(config, "head_dim") or config_attribute(config, "hidden_size") // query_heads)
    kv_heads = _module_int(module, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    projection = getattr(module, "k_proj", None)
    if kv_heads is None and isinstance(projection, nn.Linear) and projection.out_features % key_dim == 0:
        kv_heads = projection.out_features // key_dim
    groups = _module_int(module, ("num_key_value_groups",))
    if kv_heads is None and groups is not None:
        kv_heads = query_heads // groups
    if kv_heads is None and declared_heads is not None:
        kv_heads = query_heads  # a module that counts its own heads and no KV groups: no GQA
    kv_heads = kv_heads or int(config_attribute(config, "num_key_value_heads") or query_heads)
    return tensor_parallel_shape(module, SiteShape(query_heads, kv_heads, key_dim))


# Projections whose output rows are the heads' features, head after head (in the order
# transformers' tensor-parallel plans shard them column-wise); MLA expands keys with kv_b_proj.
KEY_PROJECTIONS = ("k_proj", "kv_b_proj")
QUERY_PROJECTIONS = ("q_proj", "q_b_proj")


def tensor_parallel_shape(module: nn.Module, shape: SiteShape) -> SiteShape:
    """`shape` (the model's heads) as this rank sees it when tensor parallelism shards the
    module's key projection by rows (transformers' tp_plan, torch's ColwiseParallel): the rank's
    KV heads, read from where its shard of the projection weight lies (a DTensor), and its
    query heads likewise. Unsharded modules keep `shape`."""
    keys = _head_shard(module, KEY_PROJECTIONS, shape.kv_heads)
    if keys is None:
        return shape
    queries = _head_shard(module, QUERY_PROJECTIONS, shape.query_heads)
    query_heads = shape.query_heads if queries is None else queries.count
    if keys.count == keys.total:
        return dataclasses.replace(shape, query_heads=query_heads)
    return SiteShape(query_heads, keys.count, shape.key_dim, keys)


def _head_shard(module: nn.Module, names: tuple, heads: int) -> Optional[HeadShard]:
    """This rank's heads of the first projection of `names` whose weight is a DTensor."""
    for name in names:
        what = f"{type(module).__name__}.{name}.weight"
        rows = row_shard(getattr(getattr(module, name, None), "weight", None), what)
        if rows is not None:
            first, count, total = rows
            shard = HeadShard.from_rows(first, count, total, max(total // heads, 1), what)
            if shard.total != heads:
                raise GSAError(f"{what} has {total} rows, not a whole number of rows for each of its {heads} heads")
            return shard
    return None


def is_sliding(module: nn.Module, config=None) -> bool:
    """Whether the layer attends a sliding window (such layers stay dense: their window already
    bounds what they read, and their cache layers drop old keys)."""
    flag = getattr(module, "is_sliding", None)
    if isinstance(flag, bool):  # models that keep the config's window on every layer (EXAONE 4)
        return flag and getattr(module, "sliding_window", True) is not None
    if hasattr(module, "sliding_window"):
        return module.sliding_window is not None
    config = model_config(module, config)
    layer_types = config_attribute(config, "layer_types")
    if layer_types is not None and module.layer_idx < len(layer_types):
        return "sliding" in str(layer_types[module.layer_idx]) or "chunked" in str(layer_types[module.layer_idx])
    windowed = config_attribute(config, "sliding_window") is not None
    return windowed and config_attribute(config, "use_sliding_window") is not False


def model_policy_note(module: nn.Module) -> str:
    """Why the model's own attention semantics keep this layer dense ("" when nothing does):
    what the sparse path does not compute exactly."""
    if getattr(module, "indexer", None) is not None:
        return "the model selects its keys with its own indexer (sparse attention already); kept dense"
    return ""


def model_eager_function(module: nn.Module) -> Optional[Callable]:
    """The `eager_attention_forward` of the module's modeling file (each model has its own)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def effective_policies(
    config: GSAConfig, modules: dict[int, nn.Module], model_config=None
) -> dict[int, tuple[str, str]]:
    """layer -> (policy, note): the config's policy, with layers the model keeps dense
    (sliding windows, the model's own key selection) dense, and a reuse of a layer that
    ended up dense (or is no attention layer) turned into a layer computing its own selection."""
    result: dict[int, tuple[str, str]] = {}
    for layer in sorted(modules):
        policy, note = config.layer_policy(layer), ""
        model_note = model_policy_note(modules[layer])
        if policy != "dense" and model_note:
            policy, note = "dense", model_note
        elif policy != "dense" and is_sliding(modules[layer], model_config):
            policy, note = "dense", "sliding-window layer: kept dense"
        elif policy == "reuse":
            source = config.selection_source(layer)
            if result.get(source, ("dense", ""))[0] != "sparse":
                what = "dense here" if source in modules else "not an attention layer"
                policy, note = "sparse", f"layer {source} it would reuse is {what}: computes its own selection"
        result[layer] = (policy, note)
    return result


def model_layer_count(model: nn.Module, layers: list) -> int:
    """How many layers the model numbers its attention modules over: its config's
    num_hidden_layers (hybrids hold attention at some of them only), or, where attention
    indices run past it, the highest index + 1."""
    config = model_config(model, getattr(model, "config", None))
    declared = None
    if config is not None:  # encoder-decoder families: the decoder's layers hold the cache
        declared = config_attribute(config, "decoder_layers") or config_attribute(config, "num_hidden_layers")
    if isinstance(declared, int) and layers and max(layers) < declared:
        return declared
    return max(layers) + 1 if layers else 0


def check_layers(config: GSAConfig, layers: list, num_layers: int, model_name: str) -> None:
    """The config must cover the model's layers: one entry per layer of the model (attention or
    not), so a layer's policy is found at its own index."""
    if config.num_hidden_layers != num_layers:
        attention = "all of them attention layers" if layers == list(range(num_layers)) else (
            f"attention at layers {layers}")
        raise GSAConfigError(
            f"the GSA config has num_hidden_layers={config.num_hidden_layers} but {model_name} has "
            f"{num_layers} layers ({attention}); use a config made for this model "
            f"(GSAConfig.for_model(model)) or one with {num_layers} layers"
        )
