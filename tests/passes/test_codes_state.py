"""Codes state: each key is encoded once, beside the cache update that brings it in, with no
recompilation per decode step."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from gsa_compile import ops
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.capture.fx_examples import ManualAttentionBlock, StaticCacheAttention, TinyDecoder
from gsa_compile.passes import codes_state
from gsa_compile.passes.codes_state import CodesState

from helpers import EXACT, config, run_compiled

LAYERS, KV_HEADS, PROMPT, STEPS = 3, 2, 16, 6


def _compiled_decoder(cfg, state=None):
    torch.manual_seed(0)
    model = TinyDecoder(layers=LAYERS, kv_heads=KV_HEADS).eval()
    options = {"config": cfg, "compiler": "eager", "reports": []}
    if state is not None:
        options["codes_state"] = state
    torch._dynamo.reset()
    return model, torch.compile(model, backend=gsa_backend, dynamic=True, options=options), options


def _generate(model, ids, steps, cache=None):
    """Greedy decode: prefill then `steps` one-token calls; (logits of each step, final cache)."""
    cache = cache if cache is not None else model.empty_cache()
    logits, cache = model(ids, cache)
    outputs = [logits[:, -1]]
    for _ in range(steps):
        logits, cache = model(logits[:, -1:].argmax(-1), cache)
        outputs.append(logits[:, -1])
    return outputs, cache


def _full_budget(**changes):
    return config(layers=LAYERS, head_dim=8, chunk_size=4, **changes)


def _reads_the_device(*args):
    raise AssertionError("stored codes were compared on the device")


def test_growing_cache_encodes_each_key_once_without_recompiling():
    model, compiled, options = _compiled_decoder(_full_budget())
    ids = torch.randint(0, 64, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, _ = _generate(model, ids, STEPS)
        counters.clear()
        _generate(compiled, ids, 2)  # compiles the prefill and the decode graph
        graphs_after_warmup = counters["stats"]["unique_graphs"]
        state = options["codes_state"]
        state.refresh()
        state.host_keys_encoded = 0
        with pytest.MonkeyPatch.context() as patch:
            # The compiled callable knows each step's past is its last result: no code is compared.
            patch.setattr(codes_state, "_codes_match", _reads_the_device)
            got, cache = _generate(compiled, ids, STEPS)
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup, "a decode step recompiled"
    for want, have in zip(reference, got):
        torch.testing.assert_close(have, want, **EXACT)
    assert state.full_reencodes == 0
    assert state.keys_encoded == LAYERS * KV_HEADS * (PROMPT + STEPS)
    for layer, (key, _) in enumerate(cache):
        weight = state.hash_weights[layer]
        torch.testing.assert_close(state.codes(layer), ops.encode(key, weight), rtol=0, atol=0)


def test_new_sequence_is_detected_and_encoded_once():
    model, compiled, options = _compiled_decoder(_full_budget())
    first = torch.randint(0, 64, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    second = torch.randint(0, 64, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _generate(compiled, first, 2)
        state = options["codes_state"]
        # The same cache length, other keys: the stored codes must not be reused.
        cache = model.empty_cache()
        _, cache = model(second, cache)
        logits, _ = compiled(second[:, :1], cache)
        want, _ = model(second[:, :1], cache)
    torch.testing.assert_close(logits, want, **EXACT)
    assert state.full_reencodes == LAYERS


def test_key_norms_kept_beside_codes():
    model, compiled, options = _compiled_decoder(_full_budget(key_norm_weighting=True))
    ids = torch.randint(0, 64, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, cache = _generate(compiled, ids, 2)
        want, _ = _generate(model, ids, 2)
    torch.testing.assert_close(got[-1], want[-1], **EXACT)
    state = options["codes_state"]
    for layer, (key, _) in enumerate(cache):
        torch.testing.assert_close(state.codes(layer, "norms"), torch.linalg.vector_norm(key, dim=-1))


def test_static_cache_index_copy_mirrors_the_cache():
    torch.manual_seed(0)
    module = StaticCacheAttention(max_len=32).eval()
    reference = StaticCacheAttention(max_len=32).eval()
    reference.load_state_dict(module.state_dict())
    state = CodesState()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=gsa_backend, options={
        "config": config(head_dim=8, chunk_size=4, budget_tokens=32), "compiler": "eager", "codes_state": state})
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:, :8], torch.arange(8)), reference(x[:, :8], torch.arange(8)), **EXACT)
        for step in range(8, 12):
            got = compiled(x[:, step:step + 1], torch.tensor([step]))
            torch.testing.assert_close(got, reference(x[:, step:step + 1], torch.tensor([step])), **EXACT)
    weight = state.hash_weights[0]
    torch.testing.assert_close(state.codes(0), ops.encode(module.key_cache, weight), rtol=0, atol=0)
    heads = module.heads
    # The whole cache once when the first graph is built, then the keys each call writes.
    assert state.keys_encoded == heads * 32 + heads * 8 + heads * 4


def test_no_cache_encodes_at_call_time():
    _, report = run_compiled(ManualAttentionBlock().eval(), config(head_dim=8), torch.randn(1, 8, 32))
    assert report.sites[0].note == "codes: call time"


class SliceAssignedCache(StaticCacheAttention):
    """A static cache written by slice assignment at a position given as an int."""

    def forward(self, x, start: int):
        batch, steps, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        self.key_cache[:, :, start:start + steps] = k
        self.value_cache[:, :, start:start + steps] = v
        keep = torch.arange(self.key_cache.shape[2])[None, :] < start + steps
        out = torch.nn.functional.scaled_dot_product_attention(q, self.key_cache, self.value_cache, attn_mask=keep)
        return self.out(out.transpose(1, 2).reshape(batch, steps, hidden))


@pytest.mark.parametrize("route", ["compile", "export"])
def test_slice_assigned_static_cache(route):
    from gsa_compile import export

    torch.manual_seed(0)
    module, reference = SliceAssignedCache(max_len=16).eval(), SliceAssignedCache(max_len=16).eval()
    reference.load_state_dict(module.state_dict())
    cfg = config(head_dim=8, chunk_size=4, budget_tokens=16)
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(5))
    if route == "compile":
        state = CodesState()
        torch._dynamo.reset()
        runner = torch.compile(module, backend=gsa_backend, dynamic=False, options={
            "config": cfg, "compiler": "eager", "codes_state": state})
    else:
        program = export(module, (x[:, :1], 1), config=cfg,
                         dynamic_shapes={"x": None, "start": torch.export.Dim.DYNAMIC})
        assert program.gsa_report.sites[0].note == "codes: slice"
        runner, state = program.module(), program.gsa_codes_state
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(runner(x[:, step:step + 1], step), reference(x[:, step:step + 1], step), **EXACT)
    torch.testing.assert_close(state.codes(0), ops.encode(module.key_cache, state.hash_weights[0]), rtol=0, atol=0)
