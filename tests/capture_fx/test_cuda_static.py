"""The FX route's static-cache decode step on a CUDA device with mode="reduce-overhead": the step
replays as a CUDA graph (no skip) with the codes update inside, compiles once, stays exact at
full budget, and the codes the caches carry equal a fresh encode after every replay."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from gsa_compile import GSAConfig, ops
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.capture.fx_examples import StaticCacheDecoder
from gsa_compile.passes.codes_state import static_codes_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LAYERS, MAX_LEN, PROMPT, STEPS = 3, 512, 300, 8


@pytest.mark.parametrize("budget, exact", [(MAX_LEN, True), (64, False)])
def test_reduce_overhead_static_decode_on_cuda(budget, exact):
    torch.manual_seed(0)
    kwargs = dict(hidden=256, heads=4, kv_heads=2, layers=LAYERS, max_len=MAX_LEN, batch=2, device="cuda")
    model, reference = StaticCacheDecoder(**kwargs).eval(), StaticCacheDecoder(**kwargs).eval()
    reference.load_state_dict(model.state_dict())
    config = GSAConfig(num_hidden_layers=LAYERS, head_dim=64, hash_bits=64, chunk_size=32, budget_tokens=budget,
                       top_k_ratio_per_layer=[0.5] * LAYERS, must_select_blocks=[0, -1], gpu_seq_len_threshold=0,
                       gpu_concurrency_threshold=0)
    torch._dynamo.reset()
    run = torch.compile(model, backend=functools.partial(gsa_backend, options={"config": config}),
                        mode="reduce-overhead")
    ids = torch.randint(0, 64, (2, PROMPT), device="cuda")
    counters.clear()
    differs = []
    with torch.no_grad():
        run(ids, torch.arange(PROMPT, device="cuda"))
        want = reference(ids, torch.arange(PROMPT, device="cuda"))
        for step in range(STEPS):
            if step == 3:  # prefill graph, decode graph warm-up run, then recording
                graphs = counters["stats"]["unique_graphs"]
            token = want[:, -1:].argmax(-1)
            position = torch.tensor([PROMPT + step], device="cuda")
            got = run(token, position).clone()
            want = reference(token, position)
            if exact:
                torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
            else:
                differs.append((got - want).abs().max().item() > 1e-3)
            for layer in model.layers:
                for entry in static_codes_of(layer.key_cache):
                    torch.testing.assert_close(entry.buffer, ops.encode(layer.key_cache, entry.weight), rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == graphs, "a decode step recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["inductor"]["cudagraph_skips"] == 0, "the decode step did not run as a CUDA graph"
    assert exact or any(differs)
