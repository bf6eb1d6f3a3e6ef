"""Per-call state travels with the call: copies of a model, threads sharing one, and a config
changed between calls all get exactly what a fresh, lone call would."""

from __future__ import annotations

import copy
import threading

import torch

from gsa_compile.capture.hf import cache_argument, optimize_transformers
from gsa_compile.capture.hf_attention import DecodeStep

from .helpers import CHUNK, decode_logits, gsa_config
from .tiny_models import VOCAB, build

PROMPT = 48
STEPS = 6


def _prompt(seed: int, batch: int = 1):
    return torch.randint(3, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def _small_budget_model():
    original = build("llama")
    return optimize_transformers(original, gsa_config(original, budget_tokens=2 * CHUNK))


def test_a_deep_copy_runs_its_own_sparse_sites():
    model = _small_budget_model()
    twin = copy.deepcopy(model)
    want, _ = decode_logits(model, _prompt(1), STEPS)
    model.gsa_runtime.reset_stats()
    got, _ = decode_logits(twin, _prompt(1), STEPS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert twin.gsa_runtime.total_stats().sparse_calls == 3 * STEPS
    assert model.gsa_runtime.total_stats().sparse_calls == 0  # the copy did not drive the original's sites
    assert all(site.runtime is twin.gsa_runtime for site in twin.gsa_runtime.sites.values())


def test_threads_sharing_one_model_get_their_own_answers():
    model = _small_budget_model()
    seeds = [11, 12, 13, 14]
    alone = {seed: decode_logits(model, _prompt(seed, batch=2), STEPS)[0] for seed in seeds}
    results, errors = {}, []

    def run(seed):
        try:
            for _ in range(3):
                results.setdefault(seed, []).append(decode_logits(model, _prompt(seed, batch=2), STEPS)[0])
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for seed in seeds:
        for got in results[seed]:
            torch.testing.assert_close(got, alone[seed], rtol=0, atol=0)


def test_a_changed_config_applies_to_the_next_call():
    model = _small_budget_model()
    _, cache = decode_logits(model, _prompt(2), STEPS)
    name = cache_argument(model)

    def selection_width():
        step = DecodeStep(model.gsa_runtime, cache)
        with torch.no_grad():
            model(_prompt(2)[:, :1], use_cache=True, gsa_step=step, **{name: cache})
        return step.selections[1].shape[-1]

    assert selection_width() == 2
    model.gsa_runtime.config.budget_tokens = 4 * CHUNK
    assert selection_width() == 4
