"""HATA's learning to hash, for one layer and one KV head (the HATA paper, ACL 2025: its training recipe).

relaxed sign  h(x) = 2 * sigmoid(sigma * x W) - 1
loss          eps * similarity + eta * bit balance + lambda * ||W^T W - I||_F^2
pairs         one query from the second half of a sequence with all its causal keys; the top
              10% of keys by q.k are labelled 20 down to 1 (linearly by rank), the rest -1

The paper writes the similarity and bit-balance terms as sums over pairs and keys. Summed over
thousands of keys per query they dwarf the decorrelation term and make SGD at lr 0.1 diverge,
so we take means instead (mean over valid pairs; squared norm of the mean relaxed code): the
same minimisers per query, on a scale the paper's coefficients and learning rate suit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .capture import LayerCapture
from .scale import norm_scaled_sigma


@dataclasses.dataclass(frozen=True)
class HataSettings:
    epochs: int = 15
    iterations: int = 20
    queries_per_iteration: int = 32
    sigma: float = 0.1
    eps: float = 0.01
    eta: float = 2.0
    lam: float = 1.0
    top_fraction: float = 0.1
    top_label: float = 20.0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-6
    lr_decay: float = 0.998
    # Not in the paper: a step never moves W by more than lr * max_grad_norm, so a sharp relaxation
    # (large sigma) cannot throw W far from orthogonal, where the quartic decorrelation term explodes.
    max_grad_norm: float = 1.0
    # Not in the paper: when set, sigma is replaced per step by temperature * sqrt(D) / rms norm, for
    # queries and keys apart (calibration/scale.py: a fixed sigma means a different sharpness per model).
    temperature: Optional[float] = None


def relaxed_sign(x: torch.Tensor, weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Differentiable stand-in for sign(x W), in (-1, 1)."""
    return 2 * torch.sigmoid(sigma * (x @ weight)) - 1


def pair_labels(dots: torch.Tensor, valid: torch.Tensor, settings: HataSettings) -> torch.Tensor:
    """dots [Q, L] (q.k), valid [Q, L] -> labels [Q, L]: the top `top_fraction` of each query's
    valid keys get top_label .. 1 by rank, the other valid keys -1, invalid keys 0."""
    counts = valid.sum(-1)
    top = torch.clamp(torch.ceil(counts * settings.top_fraction), min=1).long()
    ranks = torch.empty_like(dots, dtype=torch.long)
    order = dots.masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True)
    ranks.scatter_(-1, order, torch.arange(dots.shape[-1], device=dots.device).expand_as(dots))
    span = (top - 1).clamp(min=1).unsqueeze(-1).to(dots.dtype)
    decayed = settings.top_label - (settings.top_label - 1) * ranks.to(dots.dtype) / span
    labels = torch.where(ranks < top.unsqueeze(-1), decayed, torch.full_like(dots, -1.0))
    return labels.masked_fill(~valid, 0.0)


def similarity_loss(hq, hk, labels, valid) -> torch.Tensor:
    """Mean over valid pairs of label * ||h(q) - h(k)||^2; hq [Q, R], hk [L, R] (the keys of
    the queries' sequence), labels/valid [Q, L]."""
    distance = hq.pow(2).sum(-1, keepdim=True) + hk.pow(2).sum(-1) - 2 * hq @ hk.T
    return (labels * distance).sum() / valid.sum().clamp(min=1)


def bit_balance_loss(hk, positions) -> torch.Tensor:
    """Mean over queries of ||mean of h(k) over its causal keys||^2: 0 when every bit splits
    the keys evenly. hk [L, R], positions [Q] (query q sees keys 0..positions[q])."""
    prefix_mean = hk.cumsum(0)[positions] / (positions + 1).unsqueeze(-1).to(hk.dtype)
    return prefix_mean.pow(2).sum(-1).mean()


def decorrelation_loss(weight: torch.Tensor) -> torch.Tensor:
    """||W^T W - I||_F^2: bits stay decorrelated (and columns unit-norm, so sigma keeps its
    meaning). Squared: the plain norm has a kink at its minimum, where SGD with momentum keeps
    overshooting and drags W away from orthogonal."""
    gram = weight.T @ weight
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).pow(2).sum()


def hata_loss(weight, queries, keys, positions, labels, valid, settings: HataSettings) -> tuple[torch.Tensor, dict]:
    if settings.temperature is None:
        sigma_q = sigma_k = settings.sigma
    else:
        sigma_q, sigma_k = (norm_scaled_sigma(x, settings.temperature) for x in (queries, keys))
    hq = relaxed_sign(queries, weight, sigma_q)
    hk = relaxed_sign(keys, weight, sigma_k)
    parts = {
        "similarity": similarity_loss(hq, hk, labels, valid),
        "bit_balance": bit_balance_loss(hk, positions),
        "decorrelation": decorrelation_loss(weight),
    }
    total = settings.eps * parts["similarity"] + settings.eta * parts["bit_balance"] + settings.lam * parts["decorrelation"]
    return total, {name: float(value.detach()) for name, value in parts.items()}


def sample_pairs(capture: LayerCapture, kv_head: int, count: int, generator: torch.Generator, settings: HataSettings):
    """`count` training queries of one KV head from one random calibration sequence (each a
    random query head of the group at a random second-half position) with all their causal
    keys: (queries [Q, D], keys [L, D], positions [Q], labels [Q, L], valid [Q, L])."""
    sequence = int(torch.randint(len(capture.keys), (1,), generator=generator))
    queries_of_sequence = capture.queries[sequence]
    local = torch.randint(queries_of_sequence.shape[1], (count,), generator=generator)
    heads = kv_head * capture.groups + torch.randint(capture.groups, (count,), generator=generator)
    queries = queries_of_sequence[heads, local]
    positions = capture.query_start[sequence] + local
    keys = capture.keys[sequence][kv_head, : int(positions.max()) + 1]
    valid = torch.arange(keys.shape[0])[None, :] <= positions[:, None]
    labels = pair_labels(queries @ keys.T, valid, settings)
    return queries, keys, positions, labels, valid


def train_head(
    capture: LayerCapture, kv_head: int, initial: torch.Tensor, settings: HataSettings, generator: torch.Generator,
    on_step=None, structure: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Trained [D, R] weight of one KV head, starting from `initial`, and the loss per step.
    structure (bool [D, R]): entries that may be non-zero (MLA's block-diagonal latent / rope
    weight); the others keep their zero: their gradient is masked, so neither momentum nor
    weight decay ever moves them."""
    weight = initial.detach().clone().float().requires_grad_(True)
    if structure is not None:
        weight.register_hook(lambda grad: grad * structure.to(grad.dtype))
    optimizer = torch.optim.SGD([weight], lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=settings.lr_decay)
    history = []
    for _ in range(settings.epochs):
        for _ in range(settings.iterations):
            batch = sample_pairs(capture, kv_head, settings.queries_per_iteration, generator, settings)
            loss, parts = hata_loss(weight, *batch, settings)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"HATA loss became {float(loss)} (parts {parts}); lower the learning rate")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([weight], settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            history.append({"loss": float(loss.detach()), **parts})
            if on_step is not None:
                on_step()
    return weight.detach(), history
