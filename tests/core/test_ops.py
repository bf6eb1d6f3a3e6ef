"""The gsa custom ops: opcheck, tracing under torch.compile and torch.export, fallback rules."""

import pytest
import torch

from gsa_compile import functional as F
from gsa_compile import ops
from gsa_compile.errors import GSAError


def site_inputs(batch=2, q_heads=4, kv_heads=2, keys=70, dim=32, chunk=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    value = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    weight = F.hash_weights(kv_heads, dim, 32, seed=seed)
    return query, key, value, weight


def attention_args(query, key, value, weight, mask=None, **overrides):
    params = dict(is_causal=False, scale=None, softcap=None, chunk_size=16, top_k_ratio=None, budget_tokens=32,
                  must_select=[0, -1], repre="max", scope="per_head", seq_len_threshold=0, concurrency_threshold=0)
    params.update(overrides)
    return (query, key, value, F.encode(key, weight), weight, mask, None, None, *params.values())


def test_opcheck_every_op():
    query, key, value, weight = site_inputs()
    codes = F.encode(key, weight)
    valid = torch.rand(2, key.shape[2], generator=torch.Generator().manual_seed(1)) > 0.2
    blocks = F.select_blocks(query, codes, weight, chunk_size=16, num_blocks=3, valid=valid)
    torch.library.opcheck(torch.ops.gsa.encode.default, (key, weight))
    torch.library.opcheck(torch.ops.gsa.select_blocks.default,
                          (query, codes, weight, valid, None, 16, 3, [0, -1], "max", "per_head"))
    torch.library.opcheck(torch.ops.gsa.sparse_attention.default,
                          (query, key, value, blocks, valid, None, 16, None, None))
    torch.library.opcheck(torch.ops.gsa.attention.default,
                          attention_args(query, key, value, weight, valid[:, None, None, :]))


def test_compiles_fullgraph_without_recompiling_for_new_lengths():
    torch._dynamo.reset()
    query, key, value, weight = site_inputs()

    def step(q, k, v, w):
        return F.gsa_attention(q, k, v, w, chunk_size=16, budget_tokens=32)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for keys in (70, 90, 130):
        q, k, v, w = site_inputs(keys=keys)
        torch.testing.assert_close(compiled(q, k, v, w), step(q, k, v, w))


def test_export_keeps_gsa_nodes():
    class Site(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.register_buffer("weight", weight)

        def forward(self, q, k, v, codes):
            return F.gsa_attention(q, k, v, self.weight, chunk_size=16, budget_tokens=32, key_codes=codes)

    query, key, value, weight = site_inputs()
    codes = F.encode(key, weight)
    program = torch.export.export(Site(weight), (query, key, value, codes))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "gsa.attention.default" in targets
    torch.testing.assert_close(program.module()(query, key, value, codes), Site(weight)(query, key, value, codes))


@pytest.mark.parametrize("overrides", [dict(seq_len_threshold=1000), dict(concurrency_threshold=3)])
def test_fallback_runs_dense_and_reports_every_block(overrides):
    query, key, value, weight = site_inputs()
    out, blocks = torch.ops.gsa.attention(*attention_args(query, key, value, weight, **overrides))
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    torch.testing.assert_close(out, dense)
    assert blocks.tolist() == [[list(range(5))] * 2] * 2


def test_prefill_is_dense_with_causal_mask():
    query, key, value, weight = site_inputs(keys=40)
    query = torch.randn(2, 4, 40, 32)
    out, _ = torch.ops.gsa.attention(*attention_args(query, key, value, weight, is_causal=True))
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense)


def test_softcap_dense_path_matches_manual_softcap():
    query, key, value, weight = site_inputs(keys=40)
    query = torch.randn(2, 4, 40, 32)
    out, _ = torch.ops.gsa.attention(*attention_args(query, key, value, weight, is_causal=True, softcap=2.0))
    logits = query.reshape(2, 2, 2, 40, 32) @ key.unsqueeze(2).transpose(-1, -2) * 32 ** -0.5
    logits = torch.tanh(logits / 2.0) * 2.0
    logits = logits.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), -torch.inf)
    expected = (torch.softmax(logits, -1) @ value.unsqueeze(2)).reshape(2, 4, 40, 32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_per_head_bool_mask_is_honoured_in_sparse_path():
    query, key, value, weight = site_inputs(keys=64)
    mask = torch.rand(2, 4, 1, 64, generator=torch.Generator().manual_seed(3)) > 0.3
    out, _ = torch.ops.gsa.attention(*attention_args(query, key, value, weight, mask, budget_tokens=64))
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_forward_under_grad_works_and_backward_says_why_not():
    query, key, value, weight = site_inputs()
    query.requires_grad_(True)
    out, _ = torch.ops.gsa.attention(*attention_args(query, key, value, weight))
    assert out.requires_grad
    with pytest.raises(GSAError, match="inference-only"):
        out.sum().backward()


def test_plain_eager_calls_skip_the_dispatcher_and_match_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    query, key, value, weight = site_inputs()
    args = attention_args(query, key, value, weight)
    with torch.no_grad():
        direct_out, direct_blocks = ops.attention(*args)
    via_op_out, via_op_blocks = torch.ops.gsa.attention(*args)
    torch.testing.assert_close(direct_out, via_op_out)
    assert torch.equal(direct_blocks, via_op_blocks)
    with torch.profiler.profile() as prof, torch.no_grad():
        ops.attention(*args)
    ran = {event.name for event in prof.events()}
    assert "gsa::sparse_attention" not in ran and "gsa::attention" not in ran
    # Anything watching the dispatcher (a dispatch mode, fake tensors, tracing) sees the op itself.
    seen = SeenOps()
    with seen, torch.no_grad():
        ops.attention(*args)
    assert seen.names[0] == "gsa.attention.default"


def test_eager_call_needing_autograd_goes_through_the_op():
    query, key, value, weight = site_inputs()
    query.requires_grad_(True)
    out, _ = ops.attention(*attention_args(query, key, value, weight))
    assert out.requires_grad
    with pytest.raises(GSAError, match="inference-only"):
        out.sum().backward()
