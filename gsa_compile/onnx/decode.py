"""A decode step with an explicit cache, the shape in which a causal LM leaves PyTorch as ONNX.

    step = DecodeStep(hf_model, config)           # any transformers causal LM the HF route optimizes
    export_decode_step(step, "model.onnx")
    tokens = greedy_decode(onnx_runner(session, step), step, prompt_ids, max_new_tokens=16)

The step runs the model's own forward (its embeddings, norms, rotary, MLP, logits processing)
on a cache built from explicit tensors, with an attention implementation that turns every GSA
site of the Hugging Face route (gsa_compile.optimize) into one gsa op: the layer's policy, hash
weight, budget and thresholds are the site's, so the exported graph decodes like the optimized
PyTorch model.

Inputs: input_ids [B, T], attention_mask [B, P + T] (1 = real token), position_ids [B, T] (when
the model's forward takes them), then per layer i past_key_values.{i}.key / .value (the tensors
the model's cache layer stores, [B, H, P, D]) and, for layers that select, past_key_values.{i}.
key_codes [B, Hkv, P, R/8] (and .key_norms [B, Hkv, P] with key-norm weighting). Outputs: logits
[B, T, V] and the matching present.{i}.* with P + T positions. Codes of the T new keys are encoded
(gsa.Encode) and appended to the past codes: the cache is never re-encoded. The same graph serves
prefill (P = 0, T = prompt length: dense attention, codes written) and decode. Sliding-window
and dense layers are plain attention (the model's own function) over a growing cache."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import logging
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import functional, ops
from ..capture.hf import cache_argument, gsa_disabled, optimize_transformers, restore_transformers
from ..capture.hf_attention import cached_head_tiles, head_order, plain_attention_reason, untiled
from ..capture.hf_sites import SITE_ATTRIBUTE, attention_owner
from ..config import GSAConfig
from ..decode import DENSE_REASONS
from ..errors import GSAError

logger = logging.getLogger(__name__)

IMPLEMENTATION = "gsa_onnx"
# Cache layer classes whose content is plain keys and values growing along dim -2. Sliding
# layers drop old keys in PyTorch; the step keeps them all and lets the model's sliding mask
# hide them, which computes the same attention.
PLAIN_LAYER_CLASSES = ("DynamicLayer", "DynamicSlidingWindowLayer")
EXPORTABLE_EXPERTS = "batched_mm"


@dataclasses.dataclass
class _StepState:
    """What one traced forward hands from the step to its attention calls: the explicit past
    codes per selecting layer, and what the calls produce (present codes, selections)."""

    device_type: str
    past_codes: dict = dataclasses.field(default_factory=dict)
    past_norms: dict = dataclasses.field(default_factory=dict)
    present_codes: dict = dataclasses.field(default_factory=dict)
    present_norms: dict = dataclasses.field(default_factory=dict)
    blocks: dict = dataclasses.field(default_factory=dict)
    plain: dict = dataclasses.field(default_factory=dict)  # layer -> why its call is plain attention


_CURRENT: contextvars.ContextVar[Optional[_StepState]] = contextvars.ContextVar("gsa_onnx_step", default=None)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes of one layer's cache tensors (from a probe forward): heads and last dims."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    dtype: torch.dtype


class DecodeStep(nn.Module):
    """One forward of a transformers causal LM over explicit past key/value/codes tensors.

    `model` is optimized with gsa_compile.optimize(model, config) unless it already is (then
    `config` must be None or the one it was optimized with); the step keeps it optimized."""

    def __init__(self, model: nn.Module, config: Optional[GSAConfig] = None, device_type: str = "cpu"):
        super().__init__()
        name = type(model).__name__
        _check_causal_lm(model)
        runtime = getattr(model, "gsa_runtime", None)
        if runtime is None or (config is not None and config is not runtime.config):
            optimize_transformers(model, config)
            runtime = model.gsa_runtime
        _refuse_latent_selection(model, runtime, name)
        self.model = model
        self.runtime = runtime
        self.device_type = device_type
        self.config: GSAConfig = runtime.config
        # The cache first: it refuses, with the reason, layers that are no attention layer
        # (recurrent or convolution state), which have no site either.
        self.layouts = _probe_layouts(model, runtime, name)
        self.num_layers = len(runtime.sites)
        if sorted(runtime.sites) != list(range(self.num_layers)):
            raise GSAError(f"{name}: attention layers {sorted(runtime.sites)} are not layers 0..{self.num_layers - 1}; "
                           f"the ONNX decode step needs every layer to be an attention layer")
        self.sites = [runtime.sites[layer] for layer in range(self.num_layers)]
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.cache_argument = cache_argument(model)
        self.key_norms = bool(self.config.key_norm_weighting)
        self.code_layers = [site.layer for site in self.sites if site.policy == "sparse"]
        self._drop_plain_sites()

    # ------------------------------------------------------------------ naming and shapes
    def past_names(self) -> list[str]:
        return [name for layer in range(self.num_layers) for name in self._cache_names("past_key_values", layer)]

    def present_names(self) -> list[str]:
        return [name for layer in range(self.num_layers) for name in self._cache_names("present", layer)]

    def input_names(self) -> list[str]:
        positions = ["position_ids"] if self.takes_positions else []
        return ["input_ids", "attention_mask", *positions, *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]

    def _cache_names(self, prefix: str, layer: int) -> list[str]:
        names = [f"{prefix}.{layer}.key", f"{prefix}.{layer}.value"]
        if layer in self.code_layers:
            names.append(f"{prefix}.{layer}.key_codes")
            if self.key_norms:
                names.append(f"{prefix}.{layer}.key_norms")
        return names

    def empty_past(self, batch: int, length: int = 0) -> list[torch.Tensor]:
        """Zero past tensors of `length` positions (0 for a prefill)."""
        past = []
        code_bytes = self.config.hash_bits // 8
        for layer, layout in enumerate(self.layouts):
            # Separate tensors, never one twice: torch.export would merge aliased inputs into one.
            past.append(torch.zeros(batch, layout.key_heads, length, layout.key_dim, dtype=layout.dtype))
            past.append(torch.zeros(batch, layout.value_heads, length, layout.value_dim, dtype=layout.dtype))
            if layer in self.code_layers:
                heads = self.sites[layer].shape.kv_heads
                past.append(torch.zeros(batch, heads, length, code_bytes, dtype=torch.uint8))
                if self.key_norms:
                    past.append(torch.zeros(batch, heads, length, dtype=torch.float32))
        return past

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask, *rest):
        out, cache, state = self._run(input_ids, attention_mask, *rest)
        presents = []
        for layer in range(self.num_layers):
            presents += [cache.layers[layer].keys, cache.layers[layer].values]
            if layer in self.code_layers:
                presents.append(state.present_codes[layer])
                if self.key_norms:
                    presents.append(state.present_norms[layer])
        return (out.logits, *presents)

    def _run(self, input_ids, attention_mask, *rest):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        position_ids, past = (rest[0], rest[1:]) if self.takes_positions else (None, rest)
        cache = DynamicCache()
        state = _StepState(self.device_type)
        tensors = iter(past)
        for layer in range(self.num_layers):
            cache_layer = DynamicLayer()
            keys, values = next(tensors), next(tensors)
            cache_layer.lazy_initialization(keys, values)
            cache_layer.keys, cache_layer.values = keys, values
            cache.layers.append(cache_layer)
            if layer in self.code_layers:
                state.past_codes[layer] = next(tensors)
                if self.key_norms:
                    state.past_norms[layer] = next(tensors)
        extra = {} if position_ids is None else {"position_ids": position_ids}
        extra[self.cache_argument] = cache
        with _export_attention(self.model), _step_state(state):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **extra)
        return out, cache, state

    def _drop_plain_sites(self) -> None:
        """Run two tokens through the step once: selecting sites whose calls turn out plain (the
        model passes attention sinks or position bias) keep no codes, so the graph has no
        past/present codes that nothing reads."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=next(self.model.parameters()).device)
        leading = [ids, torch.ones_like(ids)] + ([torch.arange(2, device=ids.device)[None]] if self.takes_positions else [])
        with torch.no_grad():
            _, _, state = self._run(*leading, *self.empty_past(1))
        self.plain_reasons = dict(state.plain)
        self.code_layers = [layer for layer in self.code_layers if layer not in state.plain]
        if self.plain_reasons:
            logger.info("ONNX decode step: layers exported as plain attention: %s", self.plain_reasons)


# ------------------------------------------------------------------ the attention the step exports
def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention implementation a DecodeStep traces: one gsa op per GSA site, the model's
    own attention function for every layer the Hugging Face route keeps plain."""
    site = getattr(module, SITE_ATTRIBUTE, None)
    state = _CURRENT.get()
    if site is None or state is None:
        raise GSAError(
            f"{type(module).__name__} runs the {IMPLEMENTATION!r} attention implementation outside a "
            f"gsa_compile.onnx.DecodeStep; it only serves the ONNX export of a decode step"
        )
    reason, tiles = _plain_reason(site, module, key, attention_mask, dropout, kwargs, state)
    if reason is not None:
        if site.policy != "dense":
            state.plain[site.layer] = reason
        return site.dense_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer, steps, num_keys = site.layer, query.shape[2], key.shape[2]
    options = site.attention_kwargs(state.device_type)
    mask = _explicit_mask(attention_mask, steps, num_keys, query.device)
    softcap = kwargs.get("softcap")
    if tiles > 1:
        # Keys tiled over the cached heads (JetMoE): attend the cached heads, whose codes the
        # cache holds, with the query heads grouped by the head they read, as the HF route does.
        query, key, value, mask, _ = untiled(query, key, value, mask, None, site.shape.kv_heads, tiles)
    if site.policy == "sparse":
        new_keys = key[:, :, num_keys - steps:]
        codes = torch.cat([state.past_codes[layer], functional.encode(new_keys, site.hash_weight)], dim=2)
        norms = None
        if layer in state.past_norms:
            norms = torch.cat([state.past_norms[layer], functional.key_norms(new_keys)], dim=2)
            state.present_norms[layer] = norms
        state.present_codes[layer] = codes
        out, state.blocks[layer] = functional.gsa_attention(
            query, key, value, site.hash_weight, key_codes=codes, key_norms=norms, attn_mask=mask, scale=scaling,
            softcap=softcap, return_blocks=True, **options,
        )
    else:
        source = site.source()
        # Shape-only codes: a reusing site reads the source layer's selection, never codes.
        unused_codes = key.new_zeros((), dtype=torch.uint8).expand(*key.shape[:3], source.hash_weight.shape[-1] // 8)
        out, _ = ops.attention(
            query, key, value, unused_codes, source.hash_weight, mask, None, state.blocks[source.layer], False,
            scaling, softcap, options["chunk_size"], options["top_k_ratio"], options["budget_tokens"],
            options["must_select"], options["repre"], options["scope"], options["seq_len_threshold"],
            options["concurrency_threshold"],
        )
    if tiles > 1:
        out = head_order(out, tiles, site.shape.kv_heads, inverse=True)
    return out.transpose(1, 2).contiguous(), None


def _plain_reason(site, module, key, attention_mask, dropout, kwargs, state) -> tuple[Optional[str], int]:
    """(why a layer is exported as the model's own attention, or None for a gsa op; how many
    times the call's keys tile the cached heads), by the Hugging Face route's rules for what the
    sparse path does not implement."""
    plain = plain_attention_reason(site, module, attention_mask, dropout, kwargs)
    if plain is not None:
        return plain[1], 1
    tiles = cached_head_tiles(module, key, site)
    if tiles is None:
        return (f"{DENSE_REASONS['kv_heads_repeated']} ({key.shape[1]} key heads, {site.shape.kv_heads} cached)",
                1)
    if site.policy == "reuse" and site.source().layer not in state.blocks:
        return f"layer {site.source().layer} whose selection this layer reuses is plain attention", tiles
    return None, tiles


def _explicit_mask(attention_mask, steps, num_keys, device):
    """The model's mask cut to the keys, or (no mask: SDPA's causal case) a causal mask aligned
    to the end of the cache, so the op never branches on the number of new tokens."""
    if attention_mask is not None:
        return attention_mask[..., :num_keys]
    key_pos = torch.arange(num_keys, device=device)
    query_pos = torch.arange(steps, device=device) + (num_keys - steps)
    return (key_pos[None, :] <= query_pos[:, None])[None, None]


@contextlib.contextmanager
def _step_state(state: _StepState):
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def _export_attention(model):
    """Inside: the model's attention runs attention_forward (registered under IMPLEMENTATION,
    with the masks of the model's original implementation) and the HF route's cache hook is off."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    runtime = model.gsa_runtime
    # The module whose attention the route replaced (a multimodal model's text model: its
    # other towers keep theirs, some of which accept no other implementation).
    owner = attention_owner(model)
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS[runtime.original_implementation])
    experts = getattr(model.config, "_experts_implementation", None)
    # Mixture-of-experts layers: grouped_mm runs a transformers custom op that has no ONNX
    # translation; batched_mm computes the same products with standard ops.
    switch_experts = experts not in (None, EXPORTABLE_EXPERTS) and model._can_set_experts_implementation()
    with gsa_disabled(model):
        owner.set_attn_implementation(IMPLEMENTATION)
        if switch_experts:
            model.set_experts_implementation(EXPORTABLE_EXPERTS)
        try:
            yield
        finally:
            owner.set_attn_implementation(runtime.original_implementation)
            if switch_experts:
                model.set_experts_implementation(experts)


# ------------------------------------------------------------------ what the step can export
def _refuse_latent_selection(model: nn.Module, runtime, name: str) -> None:
    """MLA layers selecting in the latent space (gsa_compile.mla) have no ONNX lowering: the
    gsa.Attention node scores codes of the keys it attends, and a latent site's codes are those
    of the cached latents, with a query absorbed through kv_b_proj."""
    latent = [site.layer for site in runtime.computing_sites() if site.latent is not None]
    if not latent:
        return
    site = runtime.sites[latent[0]]
    restore_transformers(model, runtime)
    raise GSAError(
        f"{name}: layers {latent} select in MLA's latent space (an is_mla config), which the ONNX decode step "
        f"does not lower (its gsa.Attention node scores codes of the expanded keys it attends); export with an "
        f"expanded-key config instead: config.replace(is_mla=False, head_dim={site.shape.key_dim}, "
        f"hash_bits={8 * -(-site.shape.key_dim // 8)})"
    )


def _check_causal_lm(model: nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise GSAError(
            f"DecodeStep exports transformers causal LMs (a model with .config and .generate), got {name}; "
            f"export another model with gsa_compile.export_onnx(model, args, path, config=...)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise GSAError(f"{name} is an encoder-decoder model; the ONNX decode step covers decoder-only causal LMs")


def _probe_layouts(model: nn.Module, runtime, name: str) -> list[CacheLayout]:
    """Run two tokens through the model with the cache generate() would build and read each
    layer's cache tensors; refuse caches that hold more than growing keys and values."""
    from transformers.cache_utils import DynamicCache

    argument = cache_argument(model)
    # As generate() does: a DynamicCache where the model takes one, else none, and the model
    # builds its own (MiniMax), which its output returns under the argument's name.
    given = {argument: DynamicCache(config=model.config)} if model._supports_default_dynamic_cache() else {}
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad(), gsa_disabled(model):
        out = model(input_ids=ids, use_cache=True, **given)
    layouts = cache_layouts(given[argument] if given else out.get(argument), name)
    if len(layouts) != len(runtime.sites):
        raise GSAError(
            f"{name}: the cache has {len(layouts)} layers but the model has {len(runtime.sites)} attention "
            f"layers; the ONNX decode step needs one key/value cache layer per attention layer"
        )
    return layouts


def cache_layouts(cache, name: str) -> list[CacheLayout]:
    """Each layer's cache tensors after a 2-token forward; refuses caches and layers that hold
    anything but growing keys and values."""
    from transformers.cache_utils import DynamicCache

    cache = getattr(cache, "self_attention_cache", cache)
    # The step hands the model a DynamicCache built from the past tensors: a cache class of the
    # model's own (MiniMax's, with linear-attention state beside its layers) cannot be rebuilt so.
    if type(cache) is not DynamicCache:
        supported = f"the ONNX decode step carries a DynamicCache of {list(PLAIN_LAYER_CLASSES)} layers only"
        if cache is None:
            raise GSAError(f"{name}: a forward with use_cache=True returned no cache; {supported}")
        state = sorted(set(vars(cache)) - set(vars(DynamicCache())))
        raise GSAError(
            f"{name}: the model keeps its cache in a {type(cache).__name__}"
            + (f", which keeps state other than growing keys and values ({', '.join(state)})" if state else "")
            + f"; {supported}"
        )
    layouts = []
    for layer, cache_layer in enumerate(cache.layers):
        kind = type(cache_layer).__name__
        if kind not in PLAIN_LAYER_CLASSES:
            raise GSAError(
                f"{name}: cache layer {layer} is a {kind}, which keeps state other than growing keys and values "
                f"(recurrent or convolution state, quantized or offloaded tensors); the ONNX decode step "
                f"carries {list(PLAIN_LAYER_CLASSES)} layers only"
            )
        keys, values = cache_layer.keys, cache_layer.values
        if keys is None or keys.dim() != 4 or keys.shape[2] != 2:
            raise GSAError(
                f"{name}: cache layer {layer} holds keys of shape "
                f"{None if keys is None else tuple(keys.shape)} after 2 tokens; the ONNX decode step needs "
                f"[batch, heads, positions, dim] tensors"
            )
        layouts.append(CacheLayout(keys.shape[1], keys.shape[3], values.shape[1], values.shape[3], keys.dtype))
    return layouts


# ------------------------------------------------------------------ export and greedy decoding
def export_decode_step(
    step: DecodeStep, path: Optional[str], *, batch: int = 2, prompt: int = 3, past: int = 5,
    example_ids: Optional[torch.Tensor] = None,
):
    """Export `step` to ONNX with dynamic batch, new tokens and past length; returns the ModelProto.
    example_ids (optional) are the example's new tokens (at least 2 rows and 2 tokens)."""
    from .export import export_onnx, gsa_nodes

    vocab = step.model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab, (batch, prompt)) if example_ids is None else example_ids
    batch, prompt = input_ids.shape
    mask = torch.ones(batch, past + prompt, dtype=torch.int64)
    positions = torch.arange(past, past + prompt).expand(batch, prompt)
    dynamic = torch.export.Dim.DYNAMIC
    leading = [input_ids, mask] + ([positions] if step.takes_positions else [])
    args = (*leading, *step.empty_past(batch, past))
    cache_dims = tuple({0: dynamic, 2: dynamic} for _ in step.past_names())
    # forward(input_ids, attention_mask, *rest) takes the rest as one tuple argument in torch.export's view.
    dynamic_shapes = ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic},
                      (({0: dynamic, 1: dynamic},) if step.takes_positions else ()) + cache_dims)
    with torch.no_grad():
        program = torch.export.export(step, args, dynamic_shapes=dynamic_shapes)
    if not gsa_nodes(program):
        report = step.model.gsa_report
        layers = ", ".join(f"{site.layer}: {site.policy}" + (f" ({site.note})" if site.note else "")
                           for site in report.sites)
        plain = "; ".join(f"layer {layer}: {reason}" for layer, reason in sorted(step.plain_reasons.items()))
        raise GSAError(
            f"{type(step.model).__name__} has no GSA site to export: every attention layer is plain attention "
            f"(policies {layers}" + (f"; selecting layers whose calls are plain: {plain}" if plain else "") +
            "). Give the config a layer with top_k_ratio < 1 whose attention the sparse path implements"
        )
    return export_onnx(program, args, path, input_names=step.input_names(), output_names=step.output_names(),
                       edit=name_dims)


DIM_NAMES = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")


def name_dims(proto) -> None:
    """Give the dynamic dims of a decode step's inputs and outputs the names decoder runtimes use:
    batch_size, sequence_length (new tokens), past_sequence_length, total_sequence_length."""
    graph = proto.graph
    inputs = {value.name: value for value in graph.input}
    symbols = {}
    for name, axis, meaning in (("input_ids", 0, DIM_NAMES[0]), ("input_ids", 1, DIM_NAMES[1]),
                                ("attention_mask", 1, DIM_NAMES[3])):
        symbols.setdefault(inputs[name].type.tensor_type.shape.dim[axis].dim_param, meaning)
    for value in graph.input:
        # Every input's first dim is the batch, whether or not the exporter related the symbols.
        symbols.setdefault(value.type.tensor_type.shape.dim[0].dim_param, DIM_NAMES[0])
        if value.name.startswith("past_key_values."):
            symbols.setdefault(value.type.tensor_type.shape.dim[2].dim_param, DIM_NAMES[2])
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if not dim.dim_param:
                continue
            if dim.dim_param in symbols:
                dim.dim_param = symbols[dim.dim_param]
            elif value.name.startswith("present.") and axis == 2:
                dim.dim_param = DIM_NAMES[3]  # past + new, written as an expression by the exporter


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
        feeds = {"input_ids": tokens, "attention_mask": mask}
        if step.takes_positions:
            feeds["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -tokens.shape[1]:]
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
