"""`gsa-compile demo`: GSA on a transformers model, end to end, on the CPU, with no download.

A small Llama-shaped model with random weights reads a long random prompt once (the prefill
is dense in both modes, so it is shared), then decodes greedily twice from that same cache:
with the original dense attention and with GSA. It prints the rewrite table, the time per
decode token, the attention bytes each decode token reads (dense: all of K and V; GSA: the
codes plus the selected blocks of the selecting layers, all of K and V of the dense ones) and
how many tokens agree: position by position between the two generated sequences, and step by
step when GSA is fed the dense sequence (so one early difference does not decide the rest).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time

from ..tables import write_json

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 2048


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="GSA vs dense decoding on a built-in random-weight Llama-shaped model (CPU, no download)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=16384, help="prompt length (default 16384)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate each way (default 32)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--budget-tokens", type=int, default=2048, help="GSA token budget per selecting layer (default 2048)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a machine other "
                        "processes keep busy, 1 gives stable timings: small multi-threaded ops wait at thread barriers")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..errors import GSAConfigError

    for name in ("prompt_tokens", "new_tokens", "layers", "budget_tokens"):
        if getattr(args, name) < 1:
            raise GSAConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise GSAConfigError(f"--threads must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    result = run_demo(args.prompt_tokens, args.new_tokens, args.layers, args.budget_tokens)
    print(result["report"])
    print()
    print(format_results(result))
    if args.json:
        write_json(args.json, {key: value for key, value in result.items() if key != "report"})
    return 0


def demo_model(layers: int, seed: int = 0):
    """Llama-shaped: 8 query heads, 4 KV heads (GQA 2), head dim 128 as in Llama-3 attention,
    a narrow residual stream (512) so the decode step is dominated by attention, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=1 << 20,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def run_demo(prompt_tokens: int, new_tokens: int, layers: int, budget_tokens: int, seed: int = 0) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import StaticCache

    from ..capture.hf import gsa_disabled, optimize_transformers
    from ..config import GSAConfig

    model = demo_model(layers, seed)
    # Thresholds 0: every decode step of a selecting layer runs sparse, whatever the prompt length.
    config = GSAConfig.for_model(model, budget_tokens=budget_tokens, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
    model = optimize_transformers(model, config)
    runtime = model.gsa_runtime
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))

    # A static cache writes each new key in place; a dynamic one copies the whole cache every
    # step (torch.cat), which would cost both modes more than attention itself.
    gsa_cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens)
    with torch.no_grad():
        for start in tqdm(range(0, prompt_tokens, PREFILL_CHUNK), desc="prefill", unit="chunk"):
            logits = _forward(model, prompt[:, start:start + PREFILL_CHUNK], gsa_cache)
    dense_cache = copy.deepcopy(gsa_cache)

    with gsa_disabled(model):
        dense_tokens, dense_seconds = _greedy(model, dense_cache, logits, new_tokens, "dense decode")
    forced_cache = copy.deepcopy(gsa_cache)
    runtime.reset_stats()
    runtime.collect_stats = True
    try:
        gsa_tokens, gsa_seconds = _greedy(model, gsa_cache, logits, new_tokens, "GSA decode")
    finally:
        runtime.collect_stats = False
    stats = runtime.total_stats()
    forced_tokens, _ = _greedy(model, forced_cache, logits, new_tokens, "GSA on the dense history", dense_tokens)

    decode_calls = max(new_tokens - 1, 1)
    agree = sum(a == b for a, b in zip(dense_tokens, gsa_tokens))
    return {
        "report": model.gsa_report.table(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "layers": layers,
        "budget_tokens": budget_tokens,
        "sites": model.gsa_report.counts(),
        "dense_ms_per_token": 1e3 * statistics.median(dense_seconds),
        "gsa_ms_per_token": 1e3 * statistics.median(gsa_seconds),
        "dense_attention_bytes_per_token": _dense_bytes(model, prompt_tokens + new_tokens),
        "gsa_attention_bytes_per_token": (stats.code_bytes + stats.sparse_kv_bytes + stats.dense_kv_bytes) / decode_calls,
        "sparse_attention_calls": stats.sparse_calls,
        "tokens_agreeing": agree,
        "first_disagreement": next((i for i, (a, b) in enumerate(zip(dense_tokens, gsa_tokens)) if a != b), None),
        "next_token_agreeing_on_dense_history": sum(a == b for a, b in zip(dense_tokens, forced_tokens)),
        "dense_tokens": dense_tokens,
        "gsa_tokens": gsa_tokens,
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }


def format_results(result: dict) -> str:
    from ..tables import format_table

    dense_bytes, gsa_bytes = result["dense_attention_bytes_per_token"], result["gsa_attention_bytes_per_token"]
    rows = [
        ("", "dense", "GSA", "dense / GSA"),
        ("decode ms / token (median)", f"{result['dense_ms_per_token']:.2f}", f"{result['gsa_ms_per_token']:.2f}",
         f"{result['dense_ms_per_token'] / result['gsa_ms_per_token']:.2f}x"),
        ("attention MB read / token", f"{dense_bytes / 1e6:.2f}", f"{gsa_bytes / 1e6:.2f}", f"{dense_bytes / gsa_bytes:.2f}x"),
    ]
    lines = [format_table(rows)]
    first = result["first_disagreement"]
    lines.append(
        f"generated tokens agreeing: {result['tokens_agreeing']}/{result['new_tokens']}"
        + ("" if first is None else f" (first difference at token {first})")
        + f"; GSA's next token on the dense history: {result['next_token_agreeing_on_dense_history']}"
        f"/{result['new_tokens']} agree"
    )
    lines.append(
        f"{result['prompt_tokens']}-token prompt, {result['layers']} layers, budget {result['budget_tokens']} tokens, "
        f"{result['sparse_attention_calls']} sparse attention calls, CPU with {result['threads']} threads"
    )
    return "\n".join(lines)


def _forward(model, tokens, cache):
    """Logits of the last position after feeding `tokens` into `cache`."""
    from ..capture.hf import cache_argument

    return model(tokens, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache}).logits[:, -1]


def _greedy(model, cache, logits, steps: int, label: str, feed=None):
    """Greedy tokens from the prefill's logits, and the seconds each decode forward took. With
    `feed`, step i feeds feed[i] instead of the token chosen at step i (teacher forcing)."""
    import torch
    from tqdm.auto import tqdm

    tokens, seconds = [int(logits.argmax(-1))], []
    with torch.no_grad():
        for step in tqdm(range(steps - 1), desc=label, unit="tok"):
            fed = tokens[-1] if feed is None else feed[step]
            start = time.perf_counter()
            logits = _forward(model, torch.tensor([[fed]]), cache)
            seconds.append(time.perf_counter() - start)
            tokens.append(int(logits.argmax(-1)))
    return tokens, seconds or [float("nan")]


def _dense_bytes(model, cache_length: int) -> int:
    """K and V bytes all layers read in one dense decode step over a static cache."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = model.dtype.itemsize
    return config.num_key_value_heads * 2 * head_dim * element * config.num_hidden_layers * cache_length
