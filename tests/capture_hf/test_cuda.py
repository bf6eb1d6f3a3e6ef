"""The HF route on a CUDA device: bf16 model, Triton kernels, hash weights kept float32."""

from __future__ import annotations

import copy

import pytest
import torch

from gsa_compile.capture.hf import optimize_transformers

from .helpers import assert_codes_match_keys, decode_logits, generated_cache, gsa_config
from .tiny_models import VOCAB, build

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["llama", "gemma2", "deepseek_v3"])
def test_bf16_on_cuda_matches_original_at_full_budget(name):
    original = build(name).to("cuda", torch.bfloat16)
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original))
    assert model.gsa_runtime.sites[1].hash_weight.dtype == torch.float32
    prompt = torch.randint(3, VOCAB, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    expected, _ = decode_logits(original, prompt, 8)
    got, cache = decode_logits(model, prompt, 8)
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)
    assert assert_codes_match_keys(cache) == 2
    assert model.gsa_runtime.sites[1].stats.sparse_calls == 8


def test_small_budget_generate_with_beams_on_cuda():
    original = build("llama").to("cuda", torch.bfloat16)
    model = optimize_transformers(original, gsa_config(original, budget_tokens=32))
    prompt = torch.randint(3, VOCAB, (2, 400), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out = model.generate(prompt, max_new_tokens=8, num_beams=2, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 408)
    assert assert_codes_match_keys(generated_cache(out)) == 2
