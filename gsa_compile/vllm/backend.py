"""GSA inside vLLM's CPU attention backend.

- GSACodesCache: one per GSA layer that computes its own selection, beside the layer's
  attention, registered in vLLM's forward context the way DeepSeek-V3.2 registers its
  indexer cache. vLLM allocates its pages ([pages, kv_heads, page_size, hash_bits / 8] uint8)
  in the same KV cache group as the keys and values, so one block table addresses both, and
  prefix caching, preemption and chunked prefill keep the codes beside their keys.
- GSACPUAttentionBackend: vLLM's CPU attention with a builder that puts decode rows first
  and plans each step once (whether the decode rows go sparse, each row's length), and an implementation
  that writes codes when keys are written and runs decode rows of GSA layers through the gsa
  ops (encode, select_blocks, sparse_attention) over the selected blocks of the paged cache.
  Prefill rows, dense layers and steps the thresholds keep dense run vLLM's own kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from vllm import _custom_ops as vllm_ops
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import AttentionBackend, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import MLAAttentionSpec, SparseCacheRole

from .. import decode, ops
from ..config import GSAConfig
from ..errors import GSAError
from ..kernels.common import ceil_div
from . import paged

logger = logging.getLogger(__name__)

# Counters per GSA layer: decode rows served by GSA, decode rows served dense, blocks attended,
# sparse steps that also carried prefill rows (served by vLLM's kernel beside the GSA rows).
COUNTERS = ("sparse_rows", "dense_rows", "selected_blocks", "mixed_steps")
# Instruction sets whose cache layout paged.CPU_VEC_LAYOUT reads (vLLM's _get_attn_isa).
VEC_ISAS = ("vec", "vec16")


class GSACodesCache(torch.nn.Module, AttentionLayerBase):
    """The codes pages of one GSA layer: vLLM allocates and binds them like a KV cache."""

    def __init__(self, prefix: str, num_kv_heads: int, hash_bits: int, block_size: int, forward_context: dict):
        super().__init__()
        self.prefix = prefix
        self.num_kv_heads = num_kv_heads
        self.code_bytes = hash_bits // 8
        self.block_size = block_size
        self.kv_cache = torch.tensor([])
        if prefix in forward_context:
            raise GSAError(f"layer name {prefix!r} is already in vLLM's forward context: GSA codes were attached twice")
        forward_context[prefix] = self

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache.view(torch.uint8).view(-1, self.num_kv_heads, self.block_size, self.code_bytes)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> MLAAttentionSpec:
        # One vector per token and KV head (no separate V), as DeepSeek-V3.2's indexer cache.
        return MLAAttentionSpec(
            block_size=self.block_size, num_kv_heads=self.num_kv_heads, head_size=self.code_bytes,
            dtype=torch.uint8, cache_role=SparseCacheRole.INDEXER,
        )

    def get_attn_backend(self) -> type[AttentionBackend]:
        return GSACodesBackend

    def forward(self):  # written by the attention layer's cache update, never called
        raise GSAError("GSACodesCache holds pages only; its attention layer writes and reads them")


@dataclass
class GSALayer:
    """What one vLLM attention layer does under GSA: its policy, budget and hash weight."""

    index: int
    policy: str  # "sparse" (computes its selection) or "reuse" (takes `source`'s)
    source: int
    kwargs: dict
    weight: torch.Tensor  # [local kv_heads, head_dim, hash_bits] float32
    codes: Optional[GSACodesCache]
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(len(COUNTERS), dtype=torch.int64))


@dataclass
class GSAStep:
    """One step's plan, made once by the builder and read by every GSA layer; the selections
    computing layers make travel with it to the layers that reuse them."""

    num_decodes: int  # rows [0, num_decodes) have one query token
    num_decode_tokens: int
    rest: Optional[CPUAttentionMetadata]  # rows past the decodes, through vLLM's kernel
    reason: Optional[str]  # why the whole step runs dense (decode.DENSE_REASONS), None: decodes run GSA
    lengths: Optional[torch.Tensor] = None  # int64 [num_decodes] keys of each decode row
    long: Optional[torch.Tensor] = None  # bool [num_decodes]: at least seq_len_threshold keys
    num_keys: int = 0  # positions the codes are read for: the longest row, in whole GSA blocks
    selections: dict = field(default_factory=dict)
    _limits: dict = field(default_factory=dict)

    def limit(self, kwargs: dict) -> tuple[torch.Tensor, int]:
        """(int32 [num_decodes] blocks each row takes, their maximum) for a layer's budget: long
        rows their budget, shorter rows every block (which is dense attention)."""
        key = (kwargs["top_k_ratio"], kwargs["budget_tokens"], tuple(kwargs["must_select"]))
        if key not in self._limits:
            chunk = kwargs["chunk_size"]
            k = decode.row_budget(self.lengths, chunk, *key[:2], kwargs["must_select"])
            limit = torch.where(self.long, k, ceil_div(self.lengths, chunk)).to(torch.int32)
            self._limits[key] = (limit, int(limit.max()))
        return self._limits[key]


@dataclass
class GSACPUMetadata(CPUAttentionMetadata):
    gsa: Optional[GSAStep] = None


class GSACPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from .plugin import active_config

        self.gsa_config: GSAConfig = active_config()
        self.seq_len_threshold, self.concurrency_threshold = self.gsa_config.thresholds("cpu")
        # Decode rows first: the GSA path then takes one leading slice of the batch.
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return GSACPUMetadata(**fields, gsa=self._plan(common_prefix_len, common_attn_metadata, fast_build))

    def _plan(self, common_prefix_len, common, fast_build) -> GSAStep:
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(common, decode_threshold=1)
        seq_lens = common.seq_lens[:num_decodes].to(torch.int64).cpu()
        long_rows = int((seq_lens >= self.seq_len_threshold).sum()) if num_decodes else 0
        reason = None
        if num_decodes == 0:
            reason = "prefill"
        elif long_rows == 0:
            reason = "short"
        elif long_rows < self.concurrency_threshold:
            reason = "concurrency"
        if reason is not None:
            return GSAStep(num_decodes, num_decode_tokens, None, reason)
        rest = None
        if num_prefills:
            rest = super().build(common_prefix_len, _slice_requests(common, num_decodes, num_decode_tokens), fast_build)
        chunk = self.gsa_config.chunk_size
        num_keys = ceil_div(int(seq_lens.max()), chunk) * chunk
        device = common.seq_lens.device
        return GSAStep(num_decodes, num_decode_tokens, rest, None, lengths=seq_lens.to(device),
                       long=(seq_lens >= self.seq_len_threshold).to(device), num_keys=num_keys)


def _slice_requests(common: CommonAttentionMetadata, first_req: int, first_token: int) -> CommonAttentionMetadata:
    """The requests [first_req:] of a batch, their query offsets rebased to 0."""
    query_start = common.query_start_loc[first_req:] - common.query_start_loc[first_req]
    query_start_cpu = common.query_start_loc_cpu[first_req:] - common.query_start_loc_cpu[first_req]
    query_lens = query_start_cpu[1:] - query_start_cpu[:-1]
    seq_lens = common.seq_lens[first_req:]
    causal = common.causal[first_req:] if isinstance(common.causal, torch.Tensor) else common.causal
    return common.replace(
        query_start_loc=query_start, query_start_loc_cpu=query_start_cpu, seq_lens=seq_lens,
        num_reqs=common.num_reqs - first_req, num_actual_tokens=common.num_actual_tokens - first_token,
        max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
        block_table_tensor=common.block_table_tensor[first_req:], slot_mapping=common.slot_mapping[first_token:],
        causal=causal, positions=None if common.positions is None else common.positions[first_token:],
        _num_computed_tokens_cache=None, _token_to_req_indices_cache=None,
    )


@functools.lru_cache(maxsize=None)
def _layout_readable(isa: str, kv_heads: int, page_size: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether paged.CPU_VEC_LAYOUT reads what vLLM's CPU kernel writes for this cache shape."""
    if isa not in VEC_ISAS:
        logger.warning("GSA decode runs dense: vLLM's CPU kernels use isa %r here, whose cache layout GSA does "
                       "not read (it reads %s)", isa, list(VEC_ISAS))
        return False

    def write(key, value, key_cache, value_cache, slots):
        vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    reason = paged.layout_self_check(paged.CPU_VEC_LAYOUT, write, kv_heads, page_size, head_dim, dtype)
    if reason is not None:
        logger.warning("GSA decode runs dense for caches of (isa %s, %d KV heads, page %d, head dim %d, %s): %s",
                       isa, kv_heads, page_size, head_dim, dtype, reason)
    return reason is None


class GSACPUAttentionImpl(CPUAttentionBackendImpl):
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        gsa: Optional[GSALayer] = getattr(layer, "gsa", None)
        if gsa is None or gsa.codes is None:
            return
        tokens = min(key.shape[0], slot_mapping.shape[0])
        # [N, Hkv, D] as one row of Hkv heads and N keys: each key is encoded once, here.
        codes = ops.encode(key[:tokens].transpose(0, 1).unsqueeze(0), gsa.weight)[0].transpose(0, 1)
        paged.write_codes(gsa.codes.kv_cache, codes, slot_mapping[:tokens])

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        gsa: Optional[GSALayer] = getattr(layer, "gsa", None)
        step = getattr(attn_metadata, "gsa", None)
        if gsa is None or step is None or step.reason is not None \
                or not self._sparse_capable(layer, gsa, step):
            if gsa is not None and step is not None:
                gsa.counts[1] += step.num_decodes
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        decodes = step.num_decode_tokens
        if step.rest is not None:
            super().forward(layer, query[decodes:], key[decodes:], value[decodes:], kv_cache, step.rest,
                            output[decodes:], output_scale, output_block_scale)
            gsa.counts[3] += 1
        self._decode(layer, gsa, step, query[:decodes], kv_cache, attn_metadata, output[:decodes])
        return output

    def _decode(self, layer, gsa: GSALayer, step: GSAStep, query, kv_cache, metadata, output) -> None:
        chunk = gsa.kwargs["chunk_size"]
        table = metadata.block_table[: step.num_decodes]
        limit, width = step.limit(gsa.kwargs)
        q = query.unsqueeze(2)  # [rows, Hq, 1, D]
        if gsa.policy == "reuse":
            blocks = decode.truncate(step.selections[gsa.source], width, limit)
        else:
            codes = paged.gather_codes(gsa.codes.kv_cache, table, step.num_keys)
            valid = torch.arange(step.num_keys, device=q.device)[None, :] < step.lengths[:, None]
            blocks = ops.select_blocks(
                q, codes, gsa.weight, valid, None, chunk, width, gsa.kwargs["must_select"], gsa.kwargs["repre"],
                gsa.kwargs["scope"], limit,
            )
            step.selections[gsa.index] = blocks
        out = paged.attend_selected(
            q, paged.CPU_VEC_LAYOUT, kv_cache, table, step.lengths, blocks, chunk, step.num_keys, self.scale,
            self.logits_soft_cap or None,
        )
        output.copy_(out[:, :, 0])
        gsa.counts[0] += step.num_decodes
        gsa.counts[2] += (blocks >= 0).sum()

    def _sparse_capable(self, layer, gsa: GSALayer, step: GSAStep) -> bool:
        """Whether this layer can run the GSA path: its cache readable (checked once per shape),
        and, for a reusing layer, its source layer's selection made in this step."""
        if gsa.policy == "reuse" and gsa.source not in step.selections:
            return False
        if self.sliding_window != -1 or self.alibi_slopes is not None or self.sinks is not None \
                or self.is_fp8_kv_cache:
            return False
        return _layout_readable(
            getattr(layer, "isa", None), self.num_kv_heads, layer.kv_cache.shape[2], self.head_size,
            layer.kv_cache.dtype,
        )


class GSACPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return GSACPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return GSACPUMetadataBuilder


class GSACodesMetadataBuilder(AttentionMetadataBuilder):
    """Codes pages need no metadata of their own: the attention layer's step plan reads them."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return None


class GSACodesBackend(AttentionBackend):
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    forward_includes_kv_cache_update = False

    @staticmethod
    def get_name() -> str:
        return "GSA_CODES"

    @staticmethod
    def get_impl_cls():
        raise GSAError("GSA codes pages have no attention implementation of their own")

    @staticmethod
    def get_builder_cls():
        return GSACodesMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return CPUAttentionBackend.get_supported_kernel_block_sizes(kv_cache_spec)


def plan_layer(config: GSAConfig, layer_index: int, total_kv_heads: int, local_kv_heads: int, head_dim: int,
               tp_rank: int, tp_size: int) -> Optional[tuple]:
    """(policy, source, kwargs, weight) for one attention layer, or None when it stays dense.
    The weight rows are this tensor-parallel rank's KV heads."""
    from ..hashing import layer_hash_weight
    from ..sharding import HeadShard

    if layer_index >= config.num_hidden_layers or config.layer_policy(layer_index) == "dense":
        return None
    shard = HeadShard(_first_kv_head(total_kv_heads, local_kv_heads, tp_rank, tp_size), local_kv_heads, total_kv_heads)
    weight = layer_hash_weight(config, layer_index, local_kv_heads, head_dim, shard)
    return (config.layer_policy(layer_index), config.selection_source(layer_index),
            config.attention_kwargs(layer_index, "cpu"), weight)


def _first_kv_head(total: int, local: int, rank: int, size: int) -> int:
    # vLLM splits KV heads across ranks, or replicates each over size // total ranks.
    if size <= total:
        return rank * local
    return rank // (size // total)

