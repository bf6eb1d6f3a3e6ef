"""GSA on a Hugging Face transformers model, on the CPU, in seconds (random weights, no download).

    python examples/optimize_hf.py

With a real checkpoint the same three lines apply:
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-4B")
    model = gsa_compile.optimize(model, "Qwen/Qwen3-4B")     # the shipped config of that model
    model.generate(**inputs, max_new_tokens=256)
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gsa_compile
from gsa_compile.capture.hf import gsa_disabled, optimize_transformers

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=2, eos_token_id=None,
)).eval()

# The default policy for 6 layers (first 2 and last 3 dense), 64-token blocks, 256-token budget;
# thresholds 0 so this short prompt already decodes sparse on the CPU.
config = gsa_compile.GSAConfig.for_model(
    model, chunk_size=64, budget_tokens=256, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0,
)
model = optimize_transformers(model, config)   # gsa_compile.optimize(model, config) does the same
print(model.gsa_report)

prompt = torch.randint(3, 1000, (2, 1024))
gsa_tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)
with gsa_disabled(model):                        # the untouched dense model, for comparison
    dense_tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)

site = model.gsa_runtime.sites[2]
print(f"layer 2: {site.stats.encoded_tokens} positions encoded once each (every row and KV head of a position "
      f"together), {site.stats.sparse_calls} sparse decode calls")
agree = (gsa_tokens[:, 1024:] == dense_tokens[:, 1024:]).float().mean().item()
print(f"generated tokens equal to dense decoding: {agree:.0%} (random weights: attention is diffuse)")
