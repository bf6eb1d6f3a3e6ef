"""A transformers model over a StaticCache through the FX route (torch.compile with the gsa
backend, mode="reduce-overhead"): decode steps compile once, with no graph break, and the codes
the cache's key tensors carry equal a fresh encode after every step."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from gsa_compile import ops
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.passes.codes_state import static_codes_of

from tiny_models import VOCAB, sparse_config, tiny_model

pytest.importorskip("transformers")

MAX_LEN, PROMPT, WARMUP, STEPS = 40, 12, 2, 8
EXACT = dict(atol=1e-5, rtol=0)


def test_llama_static_cache_reduce_overhead():
    from transformers import StaticCache

    model = tiny_model("llama")
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", backend=functools.partial(
        gsa_backend, options={"config": sparse_config(model, MAX_LEN), "reports": reports}))
    caches = [StaticCache(config=model.config, max_cache_len=MAX_LEN) for _ in range(2)]
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The prefill runs eagerly (dense anyway), as generate() does with a static cache.
        for cache in caches:
            model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(PROMPT))
        token = ids[:, -1:]
        counters.clear()
        for step in range(WARMUP + STEPS):
            if step == WARMUP:
                graphs = counters["stats"]["unique_graphs"]
            position = torch.tensor([PROMPT + step])
            got = compiled(token, past_key_values=caches[0], use_cache=True, cache_position=position).logits
            want = model(token, past_key_values=caches[1], use_cache=True, cache_position=position).logits
            torch.testing.assert_close(got, want, **EXACT)
            for layer in caches[0].layers:
                entries = static_codes_of(layer.keys)
                assert entries, "the cache's keys carry no codes"
                for entry in entries:
                    torch.testing.assert_close(entry.buffer, ops.encode(layer.keys, entry.weight), rtol=0, atol=0)
            token = want[:, -1:].argmax(-1)
    assert counters["stats"]["unique_graphs"] == graphs, "a decode step recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all("codes: index_copy" in site.note for report in reports for site in report.sites), \
        [report.table() for report in reports]
