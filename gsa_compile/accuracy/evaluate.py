"""The accuracy benchmark: tasks x context lengths x budgets x selection rules.

Each sample's prompt minus its last token is prefilled ONCE, densely (every rule prefills
densely, so this is shared). Then each (rule, budget) crops the cache back to that prefix and
decodes: it feeds the last prompt token and then the true answer tokens one at a time, and the
sample counts as right when every step's argmax is the next answer token. That is exactly
greedy exact match, and every answer token comes from a decode step that went through the
rule's selection (none from the dense prefill).

A selecting layer's decode step attends only the selected blocks, through gsa_compile's
sparse_attention op; all rules share the chunk size, must-select blocks and budget k, so only
the selector differs. Layers listed in `dense_layers` stay dense under every rule. Per sparse
layer we also record the share of the true attention mass inside the selection and the
relative error of the attention output against dense attention.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from typing import Optional, Sequence

import torch

from .. import functional
from ..kernels.common import num_selected_blocks, split_decode_mask
from ..kernels.reference import selected_token_mask
from ..calibration.probe import attention_layers, attention_probe, dense_attention, forward_tokens
from ..config import GSAConfig
from ..hashing import layer_hash_weight
from ..tables import format_table
from .selectors import Selector, build_selectors
from .tasks import TASKS, make_samples

logger = logging.getLogger(__name__)

RULES = ("dense", "gsa_random", "gsa_trained", "exact", "quest", "window")
DEFAULT_BUDGETS = (0.004, 0.0156, 0.03, 0.10, 0.30)


@dataclasses.dataclass
class EvalSettings:
    tasks: Sequence[str] = TASKS
    context_lens: Sequence[int] = (2048, 4096, 8192)
    n_samples: int = 20
    budgets: Sequence[float] = DEFAULT_BUDGETS  # shares of the context length
    rules: Sequence[str] = RULES
    chunk_size: int = 16
    must_select: Sequence[int] = (0, -1)
    dense_layers: Sequence[int] = ()
    batch_size: int = 8
    seed: int = 1234
    hash_seed: int = 0


class _Accumulator:
    """Sums per (rule, budget, layer) of attention mass kept and output error."""

    def __init__(self):
        self.sums = defaultdict(lambda: [0.0, 0.0, 0])

    def add(self, key, mass: torch.Tensor, error: torch.Tensor) -> None:
        entry = self.sums[key]
        entry[0] += float(mass.sum())
        entry[1] += float(error.sum())
        entry[2] += mass.numel()

    def means(self, key) -> tuple[float, float]:
        mass, error, count = self.sums[key]
        return mass / max(count, 1), error / max(count, 1)


class _DecodeProbe:
    """The attention probe of the benchmark: dense prefill (telling the selectors), then
    decode steps through the current rule's selection."""

    def __init__(self, selectors: dict[str, Selector], settings: EvalSettings, stats: _Accumulator):
        self.selectors = selectors
        self.settings = settings
        self.stats = stats
        self.rule: Optional[str] = None
        self.budget: Optional[float] = None  # share of the keys in the cache
        self.budget_key = None

    def __call__(self, layer, module, query, key, value, attention_mask, scaling, **kwargs):
        if query.shape[2] > 1:
            for selector in self.selectors.values():
                selector.on_prefill(layer, key)
            return dense_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        if self.rule == "dense" or layer in self.settings.dense_layers:
            return dense_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        chunk = self.settings.chunk_size
        must = list(self.settings.must_select)
        tokens = math.ceil(round(self.budget * key.shape[2], 9))
        k = num_selected_blocks(key.shape[2], chunk, budget_tokens=tokens, must_select=must)
        blocks = self.selectors[self.rule].select(layer, query, key, chunk, k, must)
        mask = None if not isinstance(attention_mask, torch.Tensor) else attention_mask[..., -1:, : key.shape[2]]
        valid, bias = split_decode_mask(mask, query.shape[0], query.shape[1], key.shape[2])
        out = functional.sparse_attention(query, key, value, blocks, chunk_size=chunk, scale=scaling, valid=valid, attn_bias=bias)
        self._measure(layer, query, key, value, blocks, out, scaling, valid)
        return out.transpose(1, 2).contiguous()

    def _measure(self, layer, query, key, value, blocks, out, scaling, valid) -> None:
        batch, q_heads, _, dim = query.shape
        kv_heads = key.shape[1]
        scale = dim ** -0.5 if scaling is None else scaling
        grouped = query.float().reshape(batch, kv_heads, q_heads // kv_heads, dim)
        logits = torch.einsum("bhgd,bhld->bhgl", grouped, key.float()) * scale
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        inside = selected_token_mask(blocks, self.settings.chunk_size, key.shape[2]).unsqueeze(2)
        mass = (probs * inside).sum(-1)
        dense_out = torch.einsum("bhgl,bhlv->bhgv", probs, value.float()).reshape(batch, q_heads, -1)
        error = (out[:, :, 0].float() - dense_out).norm(dim=-1) / dense_out.norm(dim=-1).clamp(min=1e-12)
        self.stats.add((*self.budget_key, layer), mass, error)


def rule_runs(settings: EvalSettings) -> list[tuple[str, Optional[float]]]:
    """(rule, budget share) pairs to decode per prefill; dense has no budget."""
    runs = [("dense", None)] if "dense" in settings.rules else []
    return runs + [(rule, budget) for rule in settings.rules if rule != "dense" for budget in settings.budgets]


@torch.no_grad()
def _decode_correct(model, cache, prefix_len: int, ids: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """bool [B]: every teacher-forced step predicted the next answer token."""
    extra = cache.get_seq_length() - prefix_len
    if extra:  # a negative count removes tokens from the end in transformers 5.17 and 5.24 alike
        cache.crop(-extra)
    feed = torch.cat([ids[:, -1:], answers[:, :-1]], dim=1)
    correct = torch.ones(ids.shape[0], dtype=torch.bool)
    for step in range(answers.shape[1]):
        logits = forward_tokens(model, feed[:, step : step + 1], cache)
        correct &= (logits.argmax(-1).cpu() == answers[:, step].cpu())
    return correct


def evaluate(model, settings: EvalSettings, trained_weights: Optional[dict] = None, progress: bool = True) -> dict:
    """Run the grid; returns the JSON-ready results (see docs/accuracy.md)."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    layers = attention_layers(model)
    config = model.config
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    # The random weights the product itself would use for these layers (seeded hash_seed + layer).
    random_config = GSAConfig.for_model(model, hash_seed=settings.hash_seed)
    random_weights = {layer: layer_hash_weight(random_config, layer, kv_heads, random_config.head_dim) for layer in layers}
    rules = [rule for rule in settings.rules if rule != "gsa_trained" or trained_weights is not None]
    if len(rules) != len(settings.rules):
        logger.warning("no trained hash weights given: rule gsa_trained left out")
    settings = dataclasses.replace(settings, rules=rules)
    selectors = build_selectors(rules, random_weights, trained_weights)
    stats = _Accumulator()
    probe = _DecodeProbe(selectors, settings, stats)
    runs = rule_runs(settings)
    correct = defaultdict(int)
    counts = defaultdict(int)
    budgets_used = {}
    device = next(model.parameters()).device
    started = time.perf_counter()
    total_batches = sum(math.ceil(settings.n_samples / settings.batch_size) for _ in settings.tasks for _ in settings.context_lens)
    with attention_probe(model, probe), tqdm(total=total_batches, desc="accuracy", unit="batch", disable=not progress) as bar:
        for length in settings.context_lens:
            for budget in settings.budgets:
                tokens = math.ceil(round(budget * length, 9))
                budgets_used[(length, budget)] = num_selected_blocks(
                    length, settings.chunk_size, budget_tokens=tokens, must_select=list(settings.must_select)
                ) * settings.chunk_size
            for task in settings.tasks:
                samples = make_samples(task, length, settings.n_samples, settings.seed)
                for start in range(0, len(samples), settings.batch_size):
                    batch = samples[start : start + settings.batch_size]
                    ids = torch.stack([s.input_ids for s in batch]).to(device)
                    answers = torch.stack([s.answer for s in batch]).to(device)
                    cache = DynamicCache(config=config)
                    forward_tokens(model, ids[:, :-1], cache)
                    for rule, budget in runs:
                        probe.rule = rule
                        probe.budget = budget
                        probe.budget_key = (rule, budget, length)
                        hits = _decode_correct(model, cache, length - 1, ids, answers)
                        correct[(task, length, rule, budget)] += int(hits.sum())
                        counts[(task, length, rule, budget)] += len(batch)
                    bar.update(1)
    return _results(settings, runs, correct, counts, stats, budgets_used, sorted(layers), time.perf_counter() - started)


def _results(settings, runs, correct, counts, stats, budgets_used, layers, seconds) -> dict:
    cells = []
    for (task, length, rule, budget), count in sorted(counts.items(), key=lambda item: str(item[0])):
        cells.append({
            "task": task, "context_len": length, "rule": rule, "budget": budget,
            "budget_tokens": None if budget is None else budgets_used[(length, budget)],
            "n": count, "accuracy": correct[(task, length, rule, budget)] / count,
        })
    attention = []
    for rule, budget in runs:
        if budget is None:
            continue
        for length in settings.context_lens:
            for layer in layers:
                if layer in settings.dense_layers:
                    continue
                mass, error = stats.means((rule, budget, length, layer))
                attention.append({
                    "rule": rule, "budget": budget, "context_len": length, "layer": layer,
                    "attention_mass": mass, "output_rel_error": error,
                })
    return {
        "settings": {**dataclasses.asdict(settings), "tasks": list(settings.tasks)},
        "accuracy": cells,
        "attention": attention,
        "seconds": seconds,
    }


def summary_rows(results: dict) -> list[list[str]]:
    """Accuracy (mean over tasks) per rule and budget for each context length, plus the mean
    attention mass kept over sparse layers."""
    settings = results["settings"]
    rows = [["context", "rule"] + [f"{b:.2%}" for b in settings["budgets"]] + ["mass @ each budget"]]
    by_cell = defaultdict(list)
    for cell in results["accuracy"]:
        by_cell[(cell["context_len"], cell["rule"], cell["budget"])].append(cell["accuracy"])
    masses = defaultdict(list)
    for entry in results["attention"]:
        masses[(entry["context_len"], entry["rule"], entry["budget"])].append(entry["attention_mass"])
    for length in settings["context_lens"]:
        for rule in settings["rules"]:
            if rule == "dense":
                acc = _mean(by_cell[(length, "dense", None)])
                rows.append([str(length), "dense"] + [f"{acc:.3f}"] * len(settings["budgets"]) + ["1.000"])
                continue
            accs = [f"{_mean(by_cell[(length, rule, b)]):.3f}" for b in settings["budgets"]]
            mass = " ".join(f"{_mean(masses[(length, rule, b)]):.2f}" for b in settings["budgets"])
            rows.append([str(length), rule] + accs + [mass])
    return rows


def summary_table(results: dict) -> str:
    return format_table(summary_rows(results))


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def plot(results: dict, path: str) -> None:
    """Accuracy (mean over tasks) vs budget, one line per rule, one panel per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    lengths = settings["context_lens"]
    by_cell = defaultdict(list)
    for cell in results["accuracy"]:
        by_cell[(cell["context_len"], cell["rule"], cell["budget"])].append(cell["accuracy"])
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), sharey=True, squeeze=False)
    budgets = settings["budgets"]
    for axis, length in zip(axes[0], lengths):
        for rule in settings["rules"]:
            if rule == "dense":
                axis.axhline(_mean(by_cell[(length, "dense", None)]), color="black", linestyle="--", label="dense")
                continue
            axis.plot([100 * b for b in budgets], [_mean(by_cell[(length, rule, b)]) for b in budgets], marker="o", label=rule)
        axis.set_xscale("log")
        axis.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
        axis.set_title(f"{length} tokens")
        axis.set_xlabel("budget (share of context)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy (mean over tasks)")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def merge_results(parts: Sequence[dict]) -> dict:
    """One result from runs over different context lengths with otherwise equal settings."""
    merged = {**parts[0], "accuracy": [], "attention": [], "seconds": 0.0}
    merged["settings"] = {**parts[0]["settings"], "context_lens": []}
    for part in parts:
        merged["settings"]["context_lens"] += list(part["settings"]["context_lens"])
        merged["accuracy"] += part["accuracy"]
        merged["attention"] += part["attention"]
        merged["seconds"] += part["seconds"]
    return merged
