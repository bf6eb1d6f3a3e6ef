"""The relaxed sign's sharpness scaled to the model's query and key norms.

HATA trains ``h(x) = 2 sigmoid(sigma x W) - 1`` with W's columns kept near unit norm (the
decorrelation term). For a unit column w that is not aligned with x, ``x . w`` has standard
deviation about ``|x| / sqrt(D)`` (D the head dim), so the sigmoid's argument is typically

    a = sigma * |x| / sqrt(D).

Everything about the relaxation depends on ``a``: for a << 1 it is linear (h(q) . h(k) is a
bilinear form, the codes' sign structure is invisible to the loss and training barely moves
the codes), for a >> 1 it saturates (gradients vanish except near each hyperplane). A fixed
sigma therefore means different things on different models: the paper's 0.1 suits the scale of
its models' queries and keys, and on the project's 64-dim model (|x| about 14) it gives
a = 0.1 * 14 / 8 = 0.18, almost linear. The dimensionless *temperature* ``a`` is what should
be fixed; per layer, KV head and side (queries and keys have different norms)

    sigma_q = temperature * sqrt(D) / rms(|q|),    sigma_k = temperature * sqrt(D) / rms(|k|).

sign(x W) does not depend on the scale of x, so the codes the weights produce are unaffected;
only the training signal is. ``HataSettings(temperature=...)`` turns this on: each training
step measures the rms norms on its own batch (its queries; all causal keys of its sequence),
so the sharpness follows every layer and KV head without a separate pass.
"""

from __future__ import annotations

import math

import torch

from .capture import LayerCapture


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of the vector norms over the last dim of ``x`` [..., D] (a scalar)."""
    return x.float().pow(2).sum(-1).mean().sqrt()


def norm_scaled_sigma(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``temperature * sqrt(D) / rms(|x|)``: the sigma at which the relaxed sign's argument of
    the rows of ``x`` [N, D] has rms ``temperature`` for a random unit column (detached)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return (temperature * math.sqrt(x.shape[-1]) / rms_norm(x.detach()).clamp(min=1e-12)).detach()


def norm_statistics(captures: dict[int, LayerCapture], temperature: float = 1.0, paper_sigma: float = 0.1) -> list[dict]:
    """Per layer and KV head: rms norms of the queries (the group's heads) and keys, the sigmas
    ``temperature`` implies, and the temperature the paper's fixed sigma would have there."""
    rows = []
    for layer, capture in captures.items():
        dim = capture.head_dim
        for kv_head in range(capture.kv_heads):
            heads = slice(kv_head * capture.groups, (kv_head + 1) * capture.groups)
            queries = torch.cat([q[heads].reshape(-1, dim) for q in capture.queries])
            keys = torch.cat([k[kv_head] for k in capture.keys])
            q_rms, k_rms = float(rms_norm(queries)), float(rms_norm(keys))
            rows.append({
                "layer": layer, "kv_head": kv_head, "head_dim": dim, "query_rms_norm": q_rms, "key_rms_norm": k_rms,
                "sigma_q": float(norm_scaled_sigma(queries, temperature)), "sigma_k": float(norm_scaled_sigma(keys, temperature)),
                "paper_temperature_q": paper_sigma * q_rms / math.sqrt(dim),
                "paper_temperature_k": paper_sigma * k_rms / math.sqrt(dim),
            })
    return rows
