"""The graph route on a CUDA device: Inductor compiles the rewritten graph around the gsa ops
(served by the Triton kernels), codes stay beside the cache, full budget equals dense."""

from __future__ import annotations

import pytest
import torch

from gsa_compile import GSAConfig
from gsa_compile.capture.fx_examples import TinyDecoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _generate(model, ids, steps):
    logits, cache = model(ids, model.empty_cache(ids.shape[0]))
    outputs = [logits[:, -1]]
    for _ in range(steps):
        logits, cache = model(logits[:, -1:].argmax(-1), cache)
        outputs.append(logits[:, -1])
    return torch.stack(outputs, 1)


class CudaDecoder(TinyDecoder):
    def empty_cache(self, batch: int = 1):
        return [(k.cuda(), v.cuda()) for k, v in super().empty_cache(batch)]


@pytest.mark.parametrize("budget, exact", [(512, True), (64, False)])
def test_inductor_on_cuda(budget, exact):
    torch.manual_seed(0)
    model = CudaDecoder(hidden=256, heads=4, kv_heads=2, layers=3).cuda().eval()
    ids = torch.randint(0, 64, (2, 300), device="cuda")
    config = GSAConfig.for_model(model, chunk_size=32, budget_tokens=budget, must_select_blocks=[0, -1],
                                 top_k_ratio_per_layer=[0.5] * 3, gpu_seq_len_threshold=0,
                                 gpu_concurrency_threshold=0, hash_bits=64)
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(model, backend="gsa", options={"config": config, "reports": reports})
    with torch.no_grad():
        dense, sparse = _generate(model, ids, 6), _generate(compiled, ids, 6)
    assert reports and reports[0].counts()["sparse"] == 3
    if exact:
        torch.testing.assert_close(sparse, dense, atol=2e-4, rtol=0)
    else:
        assert (sparse - dense).abs().max() > 1e-3
