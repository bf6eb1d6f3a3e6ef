"""The HF route inside compiled decode steps, as transformers' own fast path runs it:
generate(..., cache_implementation="static") auto-compiles the decode step (Inductor, mode
"reduce-overhead"; on a GPU that replays CUDA graphs). On the CPU the same compile settings
prove what CUDA graphs need: no graph break, no recompilation after warm-up, codes written into
the static cache. The thresholds stay live (not switched off) and the counters count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache, StaticCache
from transformers.generation.configuration_utils import CompileConfig

from gsa_compile.capture.hf import cache_argument, optimize_transformers

from .helpers import CHUNK, assert_codes_match_keys, generated_cache, gsa_config
from .tiny_models import VOCAB, build

PROMPT = 40
NEW_TOKENS = 9  # 8 decode steps after the prefill


def _auto_compile() -> CompileConfig:
    config = CompileConfig(fullgraph=False)  # transformers' defaults: Inductor, "reduce-overhead"
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


def _prompt(batch=2):
    ids = torch.randint(3, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row
    return ids, mask


@pytest.fixture(scope="module")
def original():
    return build("llama")


def _generate(model, compiled: bool, **kwargs):
    ids, mask = _prompt()
    options = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                   return_dict_in_generate=True)
    if compiled:
        options["compile_config"] = _auto_compile()
    else:
        options["disable_compile"] = True
    return model.generate(ids, **options, **kwargs)


@pytest.mark.parametrize("thresholds", [dict(), dict(cpu_seq_len_threshold=30, cpu_concurrency_threshold=2)])
def test_static_generate_compiles_to_one_graph_and_matches_eager(original, thresholds):
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original, budget_tokens=2 * CHUNK, **thresholds))
    eager = _generate(model, compiled=False)
    model.gsa_runtime.reset_stats()
    torch._dynamo.reset()
    counters.clear()
    compiled = _generate(model, compiled=True)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, "the decode step recompiled"
    assert torch.equal(compiled.sequences, eager.sequences)
    assert assert_codes_match_keys(generated_cache(compiled)) == 2
    stats = model.gsa_runtime.total_stats()
    # Two selecting layers and one reusing layer, one call each per decode step (the thresholds
    # of the second case let both rows through: 40 keys, 2 rows).
    assert stats.sparse_calls == 3 * (NEW_TOKENS - 1)
    assert stats.encoded_tokens == 2 * (PROMPT + NEW_TOKENS - 1)


@pytest.mark.parametrize("decided_on_device", [False, True])
def test_compiled_thresholds_still_decide_dense(original, monkeypatch, decided_on_device):
    # Row 0 holds 35 + step keys, row 1 40 + step: with a threshold of 44 the cache is short for
    # the first steps, then row 1 alone is long, fewer than 2 rows: dense all the way. On a GPU
    # the decision stays on the device and the counters add what it decided (decided_on_device).
    if decided_on_device:
        from gsa_compile import decode

        monkeypatch.setattr(decode, "is_host_readable", lambda t: False)
    config = gsa_config(original, budget_tokens=2 * CHUNK, cpu_seq_len_threshold=PROMPT + 4, cpu_concurrency_threshold=2)
    model = optimize_transformers(copy.deepcopy(original), config)
    torch._dynamo.reset()
    reference = original.generate(*_prompt()[:1], attention_mask=_prompt()[1], max_new_tokens=NEW_TOKENS,
                                  do_sample=False, cache_implementation="static", disable_compile=True)
    compiled = _generate(model, compiled=True)
    assert torch.equal(compiled.sequences, reference)
    stats = model.gsa_runtime.total_stats()
    reasons = stats.dense_reasons
    assert stats.sparse_calls == 0 and reasons["short"] + reasons["concurrency"] == 3 * (NEW_TOKENS - 1)
    assert reasons["short"] > 0 and reasons["concurrency"] > 0


@pytest.mark.parametrize("grad", [False, True])
def test_hand_compiled_forward_over_a_static_cache(original, grad):
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original, budget_tokens=2 * CHUNK))
    ids, mask = _prompt()
    name = cache_argument(model)

    def run(forward):
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW_TOKENS)
        context = torch.enable_grad() if grad else torch.no_grad()
        # A mask over the whole static cache (as generate builds it), so every step has one shape.
        full_mask = torch.cat([mask, torch.zeros_like(mask[:, :NEW_TOKENS])], dim=-1)
        with context:
            out = model(ids, attention_mask=mask, use_cache=True, **{name: cache})
            tokens = [out.logits[:, -1].argmax(-1)]
            for step in range(NEW_TOKENS - 1):
                full_mask[:, PROMPT + step] = 1
                out = forward(tokens[-1][:, None], attention_mask=full_mask, use_cache=True, **{name: cache})
                tokens.append(out.logits[:, -1].argmax(-1))
        return torch.stack(tokens, dim=1), cache

    eager, _ = run(model)
    torch._dynamo.reset()
    counters.clear()
    compiled, cache = run(torch.compile(model.forward, mode="reduce-overhead", dynamic=False))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, "the decode step recompiled"
    assert torch.equal(compiled, eager)
    assert assert_codes_match_keys(cache) == 2


def test_compiled_forward_over_a_growing_dynamic_cache_does_not_recompile_per_step(original):
    # torch.compile(model.forward) by hand over a DynamicCache: the cache grows one key per step;
    # after the prefill and the first decode step (where dynamo makes the length dynamic) no
    # step compiles again, as for the model without GSA.
    config = gsa_config(original, budget_tokens=2 * CHUNK, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
    model = optimize_transformers(copy.deepcopy(original), config)
    torch._dynamo.reset()
    counters.clear()
    forward = torch.compile(model.forward, backend="eager")
    ids = _prompt()[0]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = forward(input_ids=ids, past_key_values=cache)
        for _ in range(8):
            out = forward(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    assert counters["stats"]["unique_graphs"] <= 3, "a decode step recompiled for the new cache length"
    assert model.gsa_runtime.total_stats().sparse_calls > 0


@pytest.mark.parametrize("decided_on_device", [False, True])
def test_a_second_cache_size_compiles_with_a_dynamic_length(original, monkeypatch, decided_on_device):
    # generate() with a static cache of another size in the same process: dynamo recompiles the
    # step with a symbolic cache length (automatic dynamic shapes), so the GSA ops see symbolic
    # sizes (the block count) while tracing. On a GPU the dense-or-sparse decision is made on
    # the device; decided_on_device takes that path here.
    if decided_on_device:
        from gsa_compile import decode

        monkeypatch.setattr(decode, "is_host_readable", lambda t: False)
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original, budget_tokens=2 * CHUNK))
    torch._dynamo.reset()
    ids, mask = _prompt()
    for new_tokens in (NEW_TOKENS, NEW_TOKENS + 7):
        options = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
        eager = model.generate(ids, disable_compile=True, **options)
        compiled = model.generate(ids, compile_config=_auto_compile(), **options)
        assert torch.equal(compiled, eager)
