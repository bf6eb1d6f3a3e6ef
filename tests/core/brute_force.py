"""A second, deliberately naive implementation of docs/semantics.md (python loops, float64),
written independently of gsa_compile.kernels.reference so the two can check each other."""

import math

import torch


def code_bits(x, w):
    """bits of one vector x [D] under w [D, R] as a python list of 0/1."""
    projected = (x.double() @ w.double()).tolist()
    return [1 if value >= 0 else 0 for value in projected]


def packed(bits):
    return [sum(bits[8 * b + i] << i for i in range(8)) for b in range(len(bits) // 8)]


def select(query, key, weight, *, chunk, k, must, repre, valid=None, norms=False, shared=False, limit=None):
    """query [B, Hq, 1, D], key [B, Hkv, L, D] -> list [B][Hkv] of sorted selected block lists."""
    batch, q_heads, _, _ = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    bits = weight.shape[-1]
    n_blocks = math.ceil(num_keys / chunk)
    result = []
    for b in range(batch):
        ok = [True] * num_keys if valid is None else valid[b].tolist()
        head_scores = []
        for h in range(kv_heads):
            key_codes = [code_bits(key[b, h, j], weight[h]) for j in range(num_keys)]
            token = []
            for j in range(num_keys):
                total = 0
                for g in range(groups):
                    q_code = code_bits(query[b, h * groups + g, 0], weight[h])
                    hamming = sum(x != y for x, y in zip(q_code, key_codes[j]))
                    total += bits - 2 * hamming
                if norms:
                    total = total * float(key[b, h, j].double().norm())
                token.append(total)
            scores = []
            for c in range(n_blocks):
                members = [token[j] for j in range(c * chunk, min((c + 1) * chunk, num_keys)) if ok[j]]
                if not members:
                    scores.append(None)
                elif repre == "max":
                    scores.append(max(members))
                elif repre == "min":
                    scores.append(min(members))
                else:
                    scores.append(sum(members) / len(members))
            head_scores.append(scores)
        if shared:
            merged = []
            for c in range(n_blocks):
                values = [s[c] for s in head_scores if s[c] is not None]
                merged.append(max(values) if values else None)
            head_scores = [merged] * kv_heads
        # Negative must-select indices count back from the block of the row's last valid key.
        row_blocks = math.ceil((1 + max((j for j in range(num_keys) if ok[j]), default=-1)) / chunk)
        take = k if limit is None else min(k, int(limit[b]))
        rows = []
        for scores in head_scores:
            chosen = []
            for m in must:
                index = m if m >= 0 else row_blocks + m
                if 0 <= index < n_blocks and scores[index] is not None and index not in chosen:
                    chosen.append(index)
            chosen = sorted(chosen)[:take]
            others = sorted((c for c in range(n_blocks) if c not in chosen and scores[c] is not None),
                            key=lambda c: (-scores[c], c))
            chosen += others[: max(0, take - len(chosen))]
            rows.append(sorted(chosen))
        result.append(rows)
    return result


def attention(query, key, value, selected, *, chunk, valid=None, scale=None, softcap=None, bias=None):
    """float64 [B, Hq, 1, Dv]: exact attention of each query head over its KV head's selected
    blocks' valid tokens, nothing else read; IEEE arithmetic (NaN and inf as they fall); zeros
    where no token is attended or every attended logit is -inf."""
    batch, q_heads, _, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, q_heads, 1, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for i in range(q_heads):
            h = i // groups
            tokens = [j for c in selected[b][h] for j in range(c * chunk, min((c + 1) * chunk, num_keys))
                      if valid is None or bool(valid[b, j])]
            if not tokens:
                continue
            logits = (key[b, h, tokens].double() @ query[b, i, 0].double()) * scale
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            if bias is not None:
                logits = logits + bias[b, i if bias.shape[1] > 1 else 0, 0, tokens].double()
            if bool((logits == float("-inf")).all()):
                continue  # nothing attendable: zeros, as for a row with no token
            out[b, i, 0] = torch.softmax(logits, dim=0) @ value[b, h, tokens].double()
    return out
