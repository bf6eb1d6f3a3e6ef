"""`gsa-compile demo`: dense vs GSA decoding through `generate`, on a built-in model, no download.

A small Llama-shaped model with random weights is copied; the copy goes through
`gsa_compile.optimize` with the default config (a token budget set). Both generate greedily from
the same long random prompt with a static cache (each new key written in place; a dynamic cache
copies the whole cache every step, which would cost both modes more than attention). Prefill is
dense in both. It prints the rewrite table, the time per decode token, the attention bytes each
decode token reads (dense: all of K and V; GSA: the codes and the selected blocks of the
selecting layers, all of K and V of the dense ones) and how many generated tokens agree.

On a CUDA machine it runs on the GPU in bfloat16, otherwise on the CPU in float32.
"""

from __future__ import annotations

import copy
import statistics
import time

from ..tables import write_json

# Longest prompt of the trial forward that times this machine before the demo starts (shorter
# ones run at a lower rate: fixed costs weigh more, which overstates the estimate).
PROBE_TOKENS = 4096


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="dense vs GSA generate() on a built-in random-weight Llama-shaped model (no download)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=16384, help="prompt length (default 16384)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate each way (default 32)")
    parser.add_argument("--layers", type=int, default=5,
                        help="decoder layers (default 5; the default policy keeps layer 0 of a model this shallow dense)")
    parser.add_argument("--budget-tokens", type=int, default=1024,
                        help="GSA token budget per selecting layer (default 1024)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the CPU decode steps, both modes (default 1: a batch-1 decode step "
                             "is a chain of small ops, and split over threads each waits at a barrier, the longer "
                             "when other processes share the cores); the prefill uses all of torch's threads")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default auto: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from ..errors import GSAConfigError

    for name in ("prompt_tokens", "new_tokens", "layers", "budget_tokens"):
        if getattr(args, name) < 1:
            raise GSAConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.new_tokens < 2:
        raise GSAConfigError(f"--new-tokens must be at least 2 (the first token comes from the prefill), got {args.new_tokens}")
    if args.threads < 1:
        raise GSAConfigError(f"--threads must be a positive integer, got {args.threads}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise GSAConfigError("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
    result = run_demo(args.prompt_tokens, args.new_tokens, args.layers, args.budget_tokens, device, args.threads)
    print(result["report"])
    print()
    print(format_results(result))
    if args.json:
        write_json(args.json, {key: value for key, value in result.items() if key != "report"})
    return 0


def demo_model(layers: int, device: str = "cpu", seed: int = 0):
    """Llama-shaped: 8 query heads, 4 KV heads (GQA 2), head dim 128 as in Llama-3 attention, a
    narrow residual stream (256) so that attention dominates a decode step, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=1 << 20,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    return model.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def run_demo(prompt_tokens: int, new_tokens: int, layers: int, budget_tokens: int, device: str = "cpu",
             decode_threads: int = 1, seed: int = 0) -> dict:
    import torch

    import gsa_compile

    dense = demo_model(layers, device, seed)
    model = gsa_compile.optimize(copy.deepcopy(dense), gsa_compile.GSAConfig.for_model(dense, budget_tokens=budget_tokens))
    prompt = torch.randint(3, dense.config.vocab_size, (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(seed)).to(device)

    if device != "cpu":
        decode_threads = torch.get_num_threads()  # the host threads only launch kernels
    estimate = _estimate_seconds(dense, prompt_tokens, new_tokens)
    print(f"dense and GSA each prefill {prompt_tokens} tokens and decode {new_tokens}; "
          f"expected time: about {estimate:.0f} s (from a short trial forward on this machine)", flush=True)

    started = time.perf_counter()
    dense_tokens, dense_seconds = _generate(dense, prompt, new_tokens, "dense", decode_threads)
    # Byte counters cost a device sync per call: on the GPU they get a short run of their own.
    on_cpu = device == "cpu"
    gsa_tokens, gsa_seconds, stats = _generate_gsa(model, prompt, new_tokens, "GSA", decode_threads, on_cpu)
    if not on_cpu:
        _, _, stats = _generate_gsa(model, prompt, 2, "GSA (bytes read)", decode_threads, True)
    decode_calls = (new_tokens if on_cpu else 2) - 1
    elapsed = time.perf_counter() - started

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
        "dense_attention_bytes_per_token": _dense_bytes(dense, prompt_tokens + new_tokens),
        "gsa_attention_bytes_per_token": (stats.code_bytes + stats.sparse_kv_bytes + stats.dense_kv_bytes) / decode_calls,
        "sparse_attention_calls": stats.sparse_calls,
        "tokens_agreeing": agree,
        "first_disagreement": next((i for i, (a, b) in enumerate(zip(dense_tokens, gsa_tokens)) if a != b), None),
        "dense_tokens": dense_tokens,
        "gsa_tokens": gsa_tokens,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dense.dtype).removeprefix("torch."),
        "prefill_threads": torch.get_num_threads(),
        "decode_threads": decode_threads,
        "expected_seconds": estimate,
        "seconds": elapsed,
    }


def format_results(result: dict) -> str:
    from ..tables import format_table

    dense_ms, gsa_ms = result["dense_ms_per_token"], result["gsa_ms_per_token"]
    dense_bytes, gsa_bytes = result["dense_attention_bytes_per_token"], result["gsa_attention_bytes_per_token"]
    rows = [
        ("", "dense", "GSA", "dense / GSA"),
        ("decode ms / token (median)", f"{dense_ms:.2f}", f"{gsa_ms:.2f}", f"{dense_ms / gsa_ms:.2f}x"),
        ("decode tokens / s", f"{1e3 / dense_ms:.1f}", f"{1e3 / gsa_ms:.1f}", f"{dense_ms / gsa_ms:.2f}x"),
        ("attention MB read / token", f"{dense_bytes / 1e6:.2f}", f"{gsa_bytes / 1e6:.2f}", f"{dense_bytes / gsa_bytes:.2f}x"),
    ]
    first = result["first_disagreement"]
    where = "CPU" if result["device"] == "cpu" else result["device"]
    return "\n".join([
        format_table(rows),
        f"generated tokens agreeing: {result['tokens_agreeing']}/{result['new_tokens']}"
        + ("" if first is None else f" (first difference at token {first}: expected with random weights, whose "
           f"attention is nearly uniform, so a budget below the cache changes the logits; trained models "
           f"keep their tokens far longer)"),
        f"{result['prompt_tokens']}-token prompt, {result['layers']} layers, budget {result['budget_tokens']} tokens, "
        f"{result['sparse_attention_calls']} sparse attention calls"
        + ("" if result["sparse_attention_calls"] else
           " (the cache stayed below the device's seq_len_threshold, so every layer ran dense)")
        + f", {where} ({result['dtype']}, "
        f"decode on {result['decode_threads']} of {result['prefill_threads']} threads), "
        f"{result['seconds']:.0f} s (expected {result['expected_seconds']:.0f} s)",
    ])


class _Progress:
    """A generate() streamer: a progress bar, the time each new token arrives, and the switch to
    the decode threads once the prefill is done. generate hands it the prompt first, then every
    token as soon as it is chosen (the first one ends the prefill)."""

    def __init__(self, bar, decode_threads: int):
        self.bar = bar
        self.decode_threads = decode_threads
        self.stamps: list[float] = []
        self.tokens: list[int] = []

    def put(self, value) -> None:
        import torch

        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:  # the prompt: the prefill starts now
            return
        if len(self.stamps) == 2:
            torch.set_num_threads(self.decode_threads)
            self.bar.set_postfix_str("decoding")
        self.tokens.extend(int(token) for token in value.reshape(-1))
        self.bar.update(1)

    def end(self) -> None:
        pass


def _generate(model, prompt, new_tokens: int, label: str, decode_threads: int):
    """Greedy tokens of one generate() call with a static cache, and the seconds of each decode
    step (the prefill, which yields the first token, not among them)."""
    import torch
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    with tqdm(total=new_tokens, desc=label, unit="tok", postfix="prefill") as bar:
        progress = _Progress(bar, decode_threads)
        try:
            with torch.no_grad():
                model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", streamer=progress,
                    pad_token_id=0,
                )
        finally:
            torch.set_num_threads(threads)
    steps = [later - earlier for earlier, later in zip(progress.stamps[1:], progress.stamps[2:])]
    return progress.tokens, steps


def _generate_gsa(model, prompt, new_tokens: int, label: str, decode_threads: int, count_bytes: bool):
    """_generate on the optimized model, and the GSA statistics of that run (bytes read only
    with `count_bytes`)."""
    runtime = model.gsa_runtime
    runtime.reset_stats()
    runtime.collect_stats = count_bytes
    try:
        tokens, seconds = _generate(model, prompt, new_tokens, label, decode_threads)
    finally:
        runtime.collect_stats = False
    return tokens, seconds, runtime.total_stats()


def _estimate_seconds(model, prompt_tokens: int, new_tokens: int) -> float:
    """Seconds the demo will take, from a short trial forward: its time less a one-token forward's
    gives this machine's rate of floating-point work, which the two prefills and decodes need
    (weights: 2 per weight and token; causal attention: 2 x head dim per query head, token and
    key, 4 in a decode step). GSA's decode is counted as dense's."""
    import torch

    config = model.config
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)
    per_key = config.num_hidden_layers * config.num_attention_heads * config.head_dim

    def prefill_flops(tokens: int) -> float:
        return 2 * weights * tokens + 2 * per_key * tokens * tokens

    def forward_seconds(tokens: int) -> float:
        ids = torch.randint(3, config.vocab_size, (1, tokens), device=model.device)
        with torch.no_grad():
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            if ids.is_cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

    probe = min(PROBE_TOKENS, prompt_tokens)
    forward_seconds(min(probe, 256))  # warm-up
    step = forward_seconds(1)
    rate = prefill_flops(probe) / max(forward_seconds(probe) - step, 1e-6)
    keys = prompt_tokens + new_tokens
    decode = step + (2 * weights + 4 * per_key * keys) / rate
    return 2 * (step + prefill_flops(prompt_tokens) / rate + new_tokens * decode)


def _dense_bytes(model, cache_length: int) -> int:
    """K and V bytes all layers read in one dense decode step over a static cache."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = model.dtype.itemsize
    return config.num_key_value_heads * 2 * head_dim * element * config.num_hidden_layers * cache_length
