"""A tiny Llama saved to disk for vLLM (random weights, no tokenizer), its GSA config, and the
generation runs the vLLM tests compare. Run as a script it generates in a fresh process:

    python tests/vllm/tiny.py MODEL_DIR OUT.json [--gsa CONFIG.json] [--tp N] [--prefix-caching]

(vLLM's engine core is a spawned process, so every run needs its own interpreter.)"""

from __future__ import annotations

import argparse
import json
import os
import sys

NUM_LAYERS = 4
HEAD_DIM = 64
KV_HEADS = 2
VOCAB = 256
BLOCK_SIZE = 32
MAX_TOKENS = 8
# Small enough that prompts prefill in chunks over several steps while other requests decode:
# steps mix prefill (chunk) rows and decode rows.
MAX_BATCHED_TOKENS = 128


def save_model(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=2048,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    # Larger weights than the default init give peaked attention, so a budget that drops blocks
    # changes the output while the full budget must not.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    return path


def gsa_config(path: str, **changes) -> str:
    from gsa_compile import GSAConfig

    config = GSAConfig(
        model_name="tiny-llama", num_hidden_layers=NUM_LAYERS, head_dim=HEAD_DIM, hash_bits=64,
        chunk_size=BLOCK_SIZE, top_k_ratio_per_layer=[1, 0.3, 0.3, 0.3], top_k_index_reuse=[-1, -1, -1, 2],
        cpu_seq_len_threshold=64, cpu_concurrency_threshold=1,
    ).replace(**changes)
    config.save(path)
    return path


def prompts(lengths, seed=0):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def run(model_dir, lengths, tp=1, prefix_caching=False, repeat=1):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=1024, enforce_eager=True,
        block_size=BLOCK_SIZE, tensor_parallel_size=tp, enable_prefix_caching=prefix_caching, seed=0,
        distributed_executor_backend="mp" if tp > 1 else None, max_num_batched_tokens=MAX_BATCHED_TOKENS,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, detokenize=False, ignore_eos=True)
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts(lengths)]
    tokens = []
    for _ in range(repeat):
        outputs = llm.generate(batch, params, use_tqdm=False)
        tokens.append([list(out.outputs[0].token_ids) for out in outputs])
    counts = None
    if os.environ.get("GSA_VLLM_CONFIG"):
        from gsa_compile.vllm import layer_counts

        counts = llm.collective_rpc(layer_counts)
    return {"tokens": tokens, "counts": counts}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--lengths", default="200")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    result = run(args.model_dir, lengths, args.tp, args.prefix_caching, args.repeat)
    with open(args.out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    sys.exit(main())
