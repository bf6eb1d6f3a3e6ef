"""Export a GSA model to ONNX and run it in stock onnxruntime, on the CPU, with no download.

    python examples/export_onnx.py [--out DIR]

1. A hand-written attention block that calls gsa_compile.functional is exported with dynamic
   batch and cache length; onnxruntime's output is compared with PyTorch's.
2. A tiny random-weight Qwen3 is exported as a decode step (past/present key, value and key
   codes per layer) and decoded greedily in onnxruntime, 16 new tokens for each of 2 prompts,
   prefill included; the tokens are compared with the Hugging Face GSA route
   (gsa_compile.optimize).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

import gsa_compile
from gsa_compile import functional as F
from gsa_compile.onnx import DOMAIN, DecodeStep, export_decode_step, greedy_decode, onnx_runner


class CachedGSABlock(nn.Module):
    """One GQA attention layer over an explicit cache whose key codes are an input and an output."""

    def __init__(self, width=64, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(width, heads * head_dim)
        self.kv = nn.Linear(width, 2 * kv_heads * head_dim)
        self.out = nn.Linear(heads * head_dim, width)
        self.register_buffer("hash_weight", F.hash_weights(kv_heads, head_dim, 32, seed=0))

    def forward(self, x, past_key, past_value, past_codes):
        batch, steps, _ = x.shape
        query = self.q(x).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        key, value = self.kv(x).view(batch, steps, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        keys, values = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        codes = torch.cat([past_codes, F.encode(key, self.hash_weight)], dim=2)  # encode new keys only
        out = F.gsa_attention(query, keys, values, self.hash_weight, key_codes=codes, chunk_size=8,
                              top_k_ratio=0.25, must_select=(0, -1))
        return self.out(out.transpose(1, 2).reshape(batch, steps, -1)), keys, values, codes


def block_inputs(batch, past, steps=1):
    return (torch.randn(batch, steps, 64), torch.randn(batch, 2, past, 16), torch.randn(batch, 2, past, 16),
            torch.randint(0, 256, (batch, 2, past, 4), dtype=torch.uint8))


def export_block(out_dir):
    torch.manual_seed(0)
    block = CachedGSABlock().eval()
    path = os.path.join(out_dir, "gsa_block.onnx")
    dynamic = torch.export.Dim.DYNAMIC
    cache = {0: dynamic, 2: dynamic}
    with torch.no_grad():
        gsa_compile.export_onnx(block, block_inputs(2, 64, steps=2), path,
                                dynamic_shapes=({0: dynamic, 1: dynamic}, cache, cache, cache),
                                input_names=["x", "past_key", "past_value", "past_codes"])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    print(f"1. wrote {path}")
    print("   batch  cache  max |onnxruntime - pytorch|")
    for batch, past in ((1, 100), (4, 257), (2, 1000)):
        inputs = block_inputs(batch, past)
        with torch.no_grad():
            expected = block(*inputs)[0].numpy()
        got = session.run(None, dict(zip(["x", "past_key", "past_value", "past_codes"], (t.numpy() for t in inputs))))[0]
        print(f"   {batch:5d}  {past + 1:5d}  {np.abs(got - expected).max():.2e}")


def export_qwen3(out_dir):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )).eval()
    config = gsa_compile.GSAConfig.for_model(
        model, chunk_size=4, top_k_ratio_per_layer=[1, 0.4, 0.4], top_k_index_reuse=[-1, -1, 1],
        must_select_blocks=[0, -1], cpu_seq_len_threshold=8,
    )
    step = DecodeStep(model, config)
    path = os.path.join(out_dir, "qwen3_step.onnx")
    started = time.perf_counter()
    proto = export_decode_step(step, path)
    sites = [f"{n.op_type}" for n in proto.graph.node if n.domain == DOMAIN]
    print(f"2. wrote {path} in {time.perf_counter() - started:.1f} s; gsa nodes: {', '.join(sites)}")
    prompt = np.random.default_rng(0).integers(0, 128, (2, 40))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_tokens = greedy_decode(onnx_runner(session, step), step, prompt, 16)
    optimized = gsa_compile.optimize(copy.deepcopy(model), config)
    with torch.no_grad():
        torch_tokens = optimized.generate(torch.from_numpy(prompt), max_new_tokens=16, do_sample=False)[:, 40:]
    for row in range(prompt.shape[0]):
        print(f"   row {row} onnxruntime tokens: {onnx_tokens[row].tolist()}")
        print(f"   row {row} PyTorch GSA tokens: {torch_tokens[row].tolist()}")
    rows, steps = onnx_tokens.shape
    print(f"   agree: {int((onnx_tokens == torch_tokens.numpy()).sum())}/{onnx_tokens.size} tokens "
          f"({rows} rows x {steps} new tokens)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the .onnx files (default: a temporary folder)")
    args = parser.parse_args()
    out_dir = args.out or tempfile.mkdtemp(prefix="gsa_onnx_")
    os.makedirs(out_dir, exist_ok=True)
    export_block(out_dir)
    export_qwen3(out_dir)


if __name__ == "__main__":
    main()
