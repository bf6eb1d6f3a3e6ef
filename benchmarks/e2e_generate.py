"""End-to-end decode speed through gsa_compile.optimize and model.generate(): a
Llama-3.1-8B-shaped transformers model (random weights, bf16), GSA vs dense SDPA.

    python benchmarks/e2e_generate.py --out e2e_out                 # H200: 32 layers, batch 8, 32K and 64K
    python benchmarks/e2e_generate.py --tiny --out /tmp/e2e          # CPU smoke run of the same path

The prompt is prefilled in chunks into one cache (dense attention, codes written once per key),
then generate() decodes --new-tokens tokens from it with GSA; the cache is cropped back and the
same decode runs dense (gsa_disabled: the model's original SDPA attention). Default policy: the
first 2 and last 3 layers dense, a 2048-token budget in the others. Prints tokens/s and writes
e2e.json."""

import argparse
import contextlib
import os
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import gsa_compile
from gsa_compile.capture.hf import gsa_disabled
from gsa_compile.tables import write_json

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
            head_dim=16, vocab_size=1000, max_position_embeddings=4096)


def build_model(layers: int, tiny: bool, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=layers, eos_token_id=None, attn_implementation="sdpa",
                         **(TINY if tiny else LLAMA_31_8B))
    dtype = torch.float32 if tiny else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the serving dtype (8B fp32 would not fit twice)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk: int) -> DynamicCache:
    """All prompt tokens but the last into a fresh cache, `chunk` tokens per forward."""
    cache = DynamicCache()
    for start in range(0, ids.shape[1] - 1, chunk):
        model(ids[:, start:min(start + chunk, ids.shape[1] - 1)], past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    return cache


@torch.no_grad()
def timed_decode(model, ids, cache, new_tokens: int, device: str) -> float:
    """Seconds generate() takes to decode new_tokens tokens after the prefilled cache."""
    sync(device)
    started = time.perf_counter()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    sync(device)
    elapsed = time.perf_counter() - started
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def write(report: dict, folder: str) -> None:
    write_json(os.path.join(folder, "e2e.json"), report)


def crop_to(cache, length: int) -> None:
    # A negative crop removes that many tokens in every transformers version this runs on.
    extra = cache.get_seq_length() - length
    if extra:
        cache.crop(-extra)


def sparse_calls(model) -> int:
    return sum(site.stats.sparse_calls for site in model.gsa_runtime.sites.values())


def measure(model, batch: int, prompt: int, args, device: str) -> dict:
    generator = torch.Generator(device=device).manual_seed(prompt)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device, generator=generator)
    started = time.perf_counter()
    cache = prefill(model, ids, args.chunk)
    sync(device)
    prefill_s = time.perf_counter() - started
    cached = cache.get_seq_length()

    def timed(mode: str) -> float:
        with gsa_disabled(model) if mode == "dense" else contextlib.nullcontext():
            timed_decode(model, ids, cache, 2, device)  # warm-up: kernels compile, allocator settles
            crop_to(cache, cached)
            seconds = timed_decode(model, ids, cache, args.new_tokens, device)
            crop_to(cache, cached)
            return seconds

    # ABBA order, best of two per mode: whichever mode runs first at a cache length pays for
    # per-length work (cuDNN attention plans, allocator growth) that the other then reuses.
    calls_before = sparse_calls(model)
    gsa_first = timed("gsa")
    gsa_sparse_calls = sparse_calls(model) - calls_before
    dense_s = min(timed("dense"), timed("dense"))
    gsa_s = min(gsa_first, timed("gsa"))
    del cache
    if device == "cuda":
        torch.cuda.empty_cache()
    row = {"batch": batch, "prompt": prompt, "new_tokens": args.new_tokens, "prefill_s": prefill_s,
           "gsa_tokens_per_s": batch * args.new_tokens / gsa_s, "dense_tokens_per_s": batch * args.new_tokens / dense_s,
           "gsa_sparse_attention_calls": gsa_sparse_calls}
    row["speedup"] = row["gsa_tokens_per_s"] / row["dense_tokens_per_s"]
    print(f"batch {batch} prompt {prompt}: GSA {row['gsa_tokens_per_s']:.1f} tok/s, dense "
          f"{row['dense_tokens_per_s']:.1f} tok/s, x{row['speedup']:.2f} ({gsa_sparse_calls} sparse layer calls; "
          f"prefill {prefill_s:.1f} s)", flush=True)
    return row


@torch.no_grad()
def profile_decode(model, batch: int, prompt: int, args, device: str) -> dict:
    """Host (CPU) and device time per decode step, GSA and dense, with the ops that cost most host time."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    cache = prefill(model, ids, args.chunk)
    cached = cache.get_seq_length()
    steps = 4
    result = {}
    for mode in ("gsa", "dense"):
        context = gsa_disabled(model) if mode == "dense" else torch.no_grad()
        with context:
            timed_decode(model, ids, cache, 2, device)
            crop_to(cache, cached)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=activities) as prof:
                wall_s = timed_decode(model, ids, cache, steps, device)
            crop_to(cache, cached)
        events = prof.key_averages()
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
        device_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events)
        result[mode] = {"wall_ms_per_step": wall_s / steps * 1e3,
                        "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / steps / 1e3,
                        "device_ms_per_step": device_us / steps / 1e3,
                        "top_host_ops_us_per_step": {e.key: e.self_cpu_time_total / steps for e in top}}
        print(f"profile {mode}: wall {result[mode]['wall_ms_per_step']:.1f} ms/step (profiled), host ops "
              f"{result[mode]['host_ms_per_step']:.1f} ms/step, device "
              f"{result[mode]['device_ms_per_step']:.1f} ms/step", flush=True)
        for name, us in result[mode]["top_host_ops_us_per_step"].items():
            print(f"   {us:9.0f} us  {name[:70]}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompts", default="32768,65536", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per forward)")
    parser.add_argument("--budget-tokens", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test of the path)")
    parser.add_argument("--out", default="e2e_out")
    parser.add_argument("--profile", action="store_true",
                        help="profile 4 decode steps (host and device time) at the first prompt length instead")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    os.makedirs(args.out, exist_ok=True)

    model = build_model(args.layers, args.tiny, device)
    overrides = dict(budget_tokens=args.budget_tokens)
    if args.tiny:
        overrides.update(chunk_size=16, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
    model = gsa_compile.optimize(model, gsa_compile.GSAConfig.for_model(model, **overrides))
    print(model.gsa_report, flush=True)
    report = {"model": {"layers": args.layers, **(TINY if args.tiny else LLAMA_31_8B)}, "device": device,
              "torch": torch.__version__, "rows": []}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    prompts = [int(p) for p in args.prompts.split(",") if p]
    if args.profile:
        report["profile"] = profile_decode(model, args.batch, prompts[0], args, device)
        prompts = []
    for prompt in prompts:
        report["rows"].append(measure(model, args.batch, prompt, args, device))
        write(report, args.out)
    write(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
