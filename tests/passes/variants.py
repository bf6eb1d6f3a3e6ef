"""Hand-written attention modules generated from options (not hand-copied), like PyTorch's
fuse_attention patterns: every combination the softmax-attention rule claims to read."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCALES = ("mul", "div", "prescaled_q", "none")
MASKS = ("add", "masked_fill", "where", "none")
PRODUCTS = ("matmul", "bmm", "einsum")
LAYOUTS = ("bhsd", "bshd")


@dataclass(frozen=True)
class Variant:
    scale: str = "mul"
    mask: str = "add"
    softcap: bool = False
    upcast: bool = False
    dropout: bool = False
    layout: str = "bhsd"
    product: str = "matmul"

    @property
    def name(self) -> str:
        parts = [self.product, self.layout, f"scale-{self.scale}", f"mask-{self.mask}"]
        parts += [flag for flag in ("softcap", "upcast", "dropout") if getattr(self, flag)]
        return "_".join(parts)


def all_variants():
    """The full product, minus combinations that do not exist (bmm is 3-D, so heads are folded
    and the layout is BHSD)."""
    for scale, mask, softcap, upcast, dropout, layout, product in itertools.product(
        SCALES, MASKS, (False, True), (False, True), (False, True), LAYOUTS, PRODUCTS
    ):
        if product == "bmm" and layout != "bhsd":
            continue
        yield Variant(scale, mask, softcap, upcast, dropout, layout, product)


class HandWrittenAttention(torch.nn.Module):
    """q, k, v [B, H, T|L, D] (BHSD) in; the variant's computation inside; the variant's layout out."""

    def __init__(self, variant: Variant, softcap: float = 5.0):
        super().__init__()
        self.variant = variant
        self.softcap = softcap
        self.dropout = torch.nn.Dropout(0.0)

    def forward(self, q, k, v, keep):
        var = self.variant
        batch, heads, _, dim = q.shape
        scale = 1.0 / math.sqrt(dim)
        if var.scale == "prescaled_q":
            q = q * scale
        if var.layout == "bshd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if var.product == "bmm":
            q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        scores = self._scores(q, k)
        if var.scale == "mul":
            scores = scores * scale
        elif var.scale == "div":
            scores = scores / math.sqrt(dim)
        if var.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        mask = keep if var.product != "bmm" else keep.expand(batch, heads, *keep.shape[2:]).flatten(0, 1)
        if var.mask == "add":
            scores = scores + torch.zeros(mask.shape, dtype=scores.dtype).masked_fill(~mask, float("-inf"))
        elif var.mask == "masked_fill":
            scores = scores.masked_fill(~mask, float("-inf"))
        elif var.mask == "where":
            scores = torch.where(mask, scores, float("-inf"))
        if var.upcast:
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        else:
            probs = scores.softmax(dim=-1)
        if var.dropout:
            probs = self.dropout(probs) if var.product != "einsum" else F.dropout(probs, p=0.0, training=False)
        return self._weighted(probs, v)

    def _scores(self, q, k):
        var = self.variant
        if var.product == "einsum":
            return torch.einsum("bhqd,bhkd->bhqk" if var.layout == "bhsd" else "bqhd,bkhd->bhqk", q, k)
        if var.product == "bmm":
            return torch.bmm(q, k.transpose(1, 2))
        if var.layout == "bshd":
            return torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))
        return q @ k.transpose(-2, -1)

    def _weighted(self, probs, v):
        var = self.variant
        if var.product == "einsum":
            return torch.einsum("bhqk,bhkd->bhqd" if var.layout == "bhsd" else "bhqk,bkhd->bqhd", probs, v)
        if var.product == "bmm":
            return torch.bmm(probs, v)
        if var.layout == "bshd":
            return torch.matmul(probs, v.transpose(1, 2))
        return probs @ v
