"""Small built-in models for `gsa-compile inspect`, the examples and the tests: decoders whose
attention the FX route must find, with a growing (cat) or a static (index_copy_) KV cache
(StaticCacheDecoder: a Llama-shaped decoder over static caches, for compiled decode steps)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CachedSelfAttention(nn.Module):
    """GQA self-attention with a growing KV cache passed in and out (torch.cat along the sequence).

    repeat: "sdpa_gqa" (SDPA enable_gqa), "repeat_kv" (HF-style expand + reshape before SDPA)
    or "manual" (repeat_kv, then matmul, scale, additive mask, softmax, matmul)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, repeat: str = "sdpa_gqa"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.repeat = repeat
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x, past_key: torch.Tensor, past_value: torch.Tensor):
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        mask = _causal_keep(steps, key.shape[2], x.device)
        if self.repeat == "sdpa_gqa":
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, enable_gqa=True)
        else:
            groups = self.heads // self.kv_heads
            rk, rv = repeat_kv(key, groups), repeat_kv(value, groups)
            if self.repeat == "repeat_kv":
                out = F.scaled_dot_product_attention(q, rk, rv, attn_mask=mask)
            else:
                scores = q @ rk.transpose(-2, -1) / math.sqrt(self.head_dim)
                scores = scores + torch.zeros(mask.shape, dtype=q.dtype, device=x.device).masked_fill(~mask, float("-inf"))
                out = scores.softmax(-1) @ rv
        out = out.transpose(1, 2).reshape(batch, steps, -1)
        return self.o_proj(out), key, value


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D], head i reading KV head i // groups."""
    batch, kv_heads, length, dim = x.shape
    return x[:, :, None, :, :].expand(batch, kv_heads, groups, length, dim).reshape(batch, kv_heads * groups, length, dim)


def _causal_keep(steps: int, num_keys: int, device) -> torch.Tensor:
    """bool [steps, num_keys]: query t (the last `steps` positions) sees keys up to its position."""
    queries = torch.arange(num_keys - steps, num_keys, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= queries


class TinyDecoder(nn.Module):
    """Embedding, `layers` pre-norm blocks of CachedSelfAttention + MLP, LM head.

    forward(ids, cache) -> (logits, new cache); cache is a list of (key, value) per layer,
    empty tensors [B, Hkv, 0, D] for a new sequence (see empty_cache)."""

    def __init__(self, vocab: int = 64, hidden: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 4,
                 repeat: str = "sdpa_gqa"):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(CachedSelfAttention(hidden, heads, kv_heads, repeat) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def empty_cache(self, batch: int = 1):
        attn = self.layers[0]
        empty = torch.zeros(batch, attn.kv_heads, 0, attn.head_dim)
        return [(empty, empty) for _ in self.layers]

    def forward(self, ids, cache):
        x = self.embed(ids)
        new_cache = []
        for attn, mlp, (past_key, past_value) in zip(self.layers, self.mlps, cache):
            out, key, value = attn(self.norm(x), past_key, past_value)
            x = x + out
            x = x + mlp(self.norm(x))
            new_cache.append((key, value))
        return self.head(self.norm(x)), new_cache


class StaticCacheAttention(nn.Module):
    """Self-attention over a static KV cache buffer [B, H, max_len, D] written with index_copy_
    at `positions`; keys past the written positions are masked out."""

    def __init__(self, hidden: int = 32, heads: int = 4, max_len: int = 128, batch: int = 1):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.register_buffer("key_cache", torch.zeros(batch, heads, max_len, self.head_dim), persistent=False)
        self.register_buffer("value_cache", torch.zeros(batch, heads, max_len, self.head_dim), persistent=False)

    def forward(self, x, positions):
        batch, steps, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        self.key_cache.index_copy_(2, positions, k)
        self.value_cache.index_copy_(2, positions, v)
        slots = torch.arange(self.key_cache.shape[2], device=x.device)
        keep = slots[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(q, self.key_cache, self.value_cache, attn_mask=keep)
        return self.out(out.transpose(1, 2).reshape(batch, steps, hidden))


class StaticKVAttention(nn.Module):
    """Llama-style GQA self-attention (no rotary) over static K/V cache buffers
    [batch, kv_heads, max_len, head_dim], written with index_copy_ at `positions`; `keep`
    (bool, broadcastable to [B, H, T, max_len]) masks the unused tail."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, max_len: int, batch: int = 1,
                 head_dim: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = head_dim or hidden // heads
        factory = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False, **factory)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False, **factory)
        cache_shape = (batch, kv_heads, max_len, self.head_dim)
        self.register_buffer("key_cache", torch.zeros(cache_shape, **factory), persistent=False)
        self.register_buffer("value_cache", torch.zeros(cache_shape, **factory), persistent=False)

    def forward(self, x, positions, keep):
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        self.key_cache.index_copy_(2, positions, k)
        self.value_cache.index_copy_(2, positions, v)
        out = F.scaled_dot_product_attention(q, self.key_cache, self.value_cache, attn_mask=keep, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class StaticCacheDecoder(nn.Module):
    """A Llama-shaped decoder (embedding, pre-RMSNorm blocks of StaticKVAttention + SwiGLU MLP,
    LM head) whose layers own static KV caches. forward(ids [B, T], positions int64 [T]) ->
    logits; the mask (slot <= position) is built once per call on the device, so nothing in a
    step depends on a host-side value that changes per step."""

    def __init__(self, vocab: int = 64, hidden: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                 intermediate: int = 64, max_len: int = 64, batch: int = 1, head_dim: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        factory = dict(dtype=dtype, device=device)
        self.embed = nn.Embedding(vocab, hidden, **factory)
        self.layers = nn.ModuleList(
            StaticKVAttention(hidden, heads, kv_heads, max_len, batch, head_dim, dtype, device) for _ in range(layers))
        self.mlps = nn.ModuleList(SwiGLU(hidden, intermediate, **factory) for _ in range(layers))
        self.attn_norms = nn.ModuleList(nn.RMSNorm(hidden, **factory) for _ in range(layers))
        self.mlp_norms = nn.ModuleList(nn.RMSNorm(hidden, **factory) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden, **factory)
        self.head = nn.Linear(hidden, vocab, bias=False, **factory)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    def forward(self, ids, positions, mask_tail: bool = True):
        """mask_tail=False attends every slot, the unused tail too (a dense baseline reading the
        same cache that SDPA can run on its flash path)."""
        x = self.embed(ids)
        keep = self.slots[None, :] <= positions[:, None] if mask_tail else None
        for attn, mlp, attn_norm, mlp_norm in zip(self.layers, self.mlps, self.attn_norms, self.mlp_norms):
            x = x + attn(attn_norm(x), positions, keep)
            x = x + mlp(mlp_norm(x))
        return self.head(self.norm(x))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int, **factory):
        super().__init__()
        self.gate = nn.Linear(hidden, intermediate, bias=False, **factory)
        self.up = nn.Linear(hidden, intermediate, bias=False, **factory)
        self.down = nn.Linear(intermediate, hidden, bias=False, **factory)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ManualAttentionBlock(nn.Module):
    """Hand-written attention (matmul, mul scale, additive mask, softmax, matmul) on whole K/V."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)

    def forward(self, x, bias: Optional[torch.Tensor] = None):
        batch, steps, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5
        if bias is not None:
            scores = scores + bias
        return (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, steps, hidden)


class MultiheadPair(nn.Module):
    """Two nn.MultiheadAttention layers: the first called without attention weights (a GSA
    site), the second with PyTorch's default need_weights=True (left dense: the weights GSA would
    have to compute are the call's second output)."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.first = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.second = nn.MultiheadAttention(hidden, heads, batch_first=True)

    def forward(self, x):
        x = x + self.first(x, x, x, need_weights=False)[0]
        out, weights = self.second(x, x, x)
        return out, weights


def build_example(name: str, layers: int = 4) -> tuple[nn.Module, tuple]:
    """(model, example args) of a built-in example by name (see EXAMPLES), with seeded weights
    (the global random state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _build(name, layers)


def _build(name: str, layers: int) -> tuple[nn.Module, tuple]:
    if name in ("decoder", "decoder_repeat_kv", "decoder_manual"):
        repeat = {"decoder": "sdpa_gqa", "decoder_repeat_kv": "repeat_kv", "decoder_manual": "manual"}[name]
        model = TinyDecoder(layers=layers, repeat=repeat).eval()
        return model, (torch.randint(0, 64, (1, 16)), model.empty_cache())
    if name == "static_cache":
        return StaticCacheAttention().eval(), (torch.randn(1, 8, 32), torch.arange(8))
    if name == "manual":
        return ManualAttentionBlock().eval(), (torch.randn(1, 8, 32),)
    if name == "multihead":
        return MultiheadPair().eval(), (torch.randn(1, 8, 32),)
    raise ValueError(f"no built-in example {name!r}; examples are {list(EXAMPLES)}")


EXAMPLES = ("decoder", "decoder_repeat_kv", "decoder_manual", "static_cache", "manual", "multihead")
