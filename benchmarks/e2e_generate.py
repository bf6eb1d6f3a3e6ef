"""End-to-end decode speed through `model.generate()`: a Llama-3.1-8B-shaped transformers model
(random weights, bf16), GSA against every dense path on the same machine, in one process.

    python benchmarks/e2e_generate.py --out e2e_out                  # H200: 32 layers, the default shapes
    python benchmarks/e2e_generate.py --tiny --out /tmp/e2e           # CPU smoke run of the same paths

Paths (rows), each timed as generate() after a filled cache. generate()'s first forward is its
prefill, which transformers runs without the compiled step (eagerly, also when it compiles the
decode), so a decode step is timed as the difference of generate() of --new-tokens tokens and
of one token, over --new-tokens - 1 steps (the time per output token after the first, what a
long generation runs at); the first forward's time is reported beside it:
- static cache + transformers' auto-compile (torch.compile mode "reduce-overhead": CUDA graphs):
  gsa (gsa_compile.optimize), dense_hf (the model's own sdpa attention: with the static cache's
  mask transformers repeats K/V), dense_flex (FlexAttention decode over un-repeated K/V, the
  tail masked by a score_mod), dense_sdpa_nomask (SDPA with enable_gqa and no mask: its flash
  path, which reads exactly the dense bytes but also attends the few unused tail slots, so it is
  a speed bound, not an exact baseline), dense_gsa_kernel (gsa's own dense decode: the sparse
  kernel over every filled block);
- eager generate() over a dynamic cache (--dynamic-shapes): gsa_eager and dense_eager.
The strongest dense is the fastest exact dense row of the static paths.

The cache is filled with random keys and values for the prompt (the weights are random too)
instead of a prefill: what is measured is the decode, and every path reads the same cache. Each
path is warmed up (compiled), then timed twice in ABBA order; the best step time counts. "agree" is
the share of rows whose generated tokens equal dense_hf's; with --agreement, a run at a budget
covering every block checks that GSA then reproduces dense (the 2048-token rows differ on random
caches, whose attention is diffuse). Bytes floor per step: weights + the K/V every layer must
read (the selected blocks and the codes in sparse layers), at the copy bandwidth measured here.
"GPU busy" (CUDA): the GPU time of a step (the union of kernel intervals in profiled runs of
each path, the same difference of two generate() lengths) over its timed ms/step; well below 100% means the step waits on the host
(benchmarks/decode_profile.py breaks a step down further).
Prints a table, writes e2e.json, and a plot with --plot."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Optional

import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.generation.configuration_utils import CompileConfig

import gsa_compile
from gsa_compile.capture.hf import gsa_disabled
from gsa_compile.capture.hf_cache import attach_codes
from gsa_compile.sharding import is_dtensor
from gsa_compile.tables import format_table, write_json

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=262144)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
            head_dim=16, vocab_size=1000, max_position_embeddings=8192)
STATIC_PATHS = ("gsa", "dense_hf", "dense_flex", "dense_sdpa_nomask", "dense_gsa_kernel")
EAGER_PATHS = ("gsa_eager", "dense_eager")
EXACT_DENSE = ("dense_hf", "dense_flex", "dense_gsa_kernel")


def build_model(layers: int, tiny: bool, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=layers, eos_token_id=None, attn_implementation="sdpa",
                         **(TINY if tiny else LLAMA_31_8B))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if tiny else torch.bfloat16)  # 8B in fp32 would not fit twice
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- dense attention paths
def _decode_mask(attention_mask, key):
    if not isinstance(attention_mask, torch.Tensor):
        return None
    return attention_mask[..., -1:, : key.shape[2]]


def flex_dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """FlexAttention over un-repeated K/V (enable_gqa); the mask's invalid keys by a score_mod."""
    from torch.nn.attention.flex_attention import flex_attention

    if query.shape[2] != 1:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    valid = _decode_mask(attention_mask, key)
    valid = None if valid is None else valid.reshape(valid.shape[0], -1)
    if valid is not None and valid.dtype != torch.bool:
        valid = valid > torch.finfo(valid.dtype).min / 2

    def masked(score, b, h, q_idx, kv_idx):
        return torch.where(valid[b, kv_idx], score, float("-inf"))

    out = flex_attention(query, key, value, score_mod=None if valid is None else masked, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def sdpa_nomask_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA with enable_gqa and no mask in decode: its flash path (a speed bound: see the docstring)."""
    if query.shape[2] != 1:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def gsa_kernel_dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """gsa's dense decode: the sparse kernel over every filled block (gsa_compile.ops.dense_decode_attention)."""
    if query.shape[2] != 1 or not isinstance(attention_mask, torch.Tensor):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = gsa_compile.ops.dense_decode_attention(query, key, value, _decode_mask(attention_mask, key), scaling, None)
    return out.transpose(1, 2).contiguous(), None


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)


DENSE_FUNCTIONS = {"dense_flex": flex_dense_attention, "dense_sdpa_nomask": sdpa_nomask_attention,
                   "dense_gsa_kernel": gsa_kernel_dense_attention}


@contextlib.contextmanager
def attention_path(model, path: str):
    """Run `model` (optimized) on one path: GSA, or a dense attention implementation."""
    if path in ("gsa", "gsa_eager"):
        yield
        return
    with gsa_disabled(model):
        if path in DENSE_FUNCTIONS:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

            AttentionInterface.register(path, DENSE_FUNCTIONS[path])
            AttentionMaskInterface.register(path, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
            model.set_attn_implementation(path)
        try:
            yield
        finally:
            model.set_attn_implementation(model.gsa_runtime.original_implementation)


# ---------------------------------------------------------------------- caches
@torch.no_grad()
def fill(model, cache, batch: int, length: int, device: str, generator: torch.Generator) -> None:
    """Random keys and values for `length` positions of every layer (codes written on the way)."""
    attach_codes(cache, model.gsa_runtime)
    config = model.config
    for layer in range(config.num_hidden_layers):
        shape = (batch, kv_heads(model, layer), length, config.head_dim)
        keys = torch.randn(shape, device=device, dtype=model.dtype, generator=generator)
        cache.update(keys, torch.randn(shape, device=device, dtype=model.dtype, generator=generator), layer)


def rewind(cache, length: int) -> None:
    """Back to `length` cached positions (keys, values and codes) after a timed run."""
    for layer in cache.layers:
        for store in (layer, getattr(layer, "_gsa_codes", None)):
            if store is None:
                continue
            if hasattr(store, "cumulative_length") and isinstance(store.cumulative_length, torch.Tensor):
                store.cumulative_length.fill_(length)  # static layers
            elif getattr(store, "keys", None) is not None and store.keys.dim() == 4:
                store.keys, store.values = store.keys[:, :, :length], store.values[:, :, :length]


# ---------------------------------------------------------------------- timing
def generate_seconds(model, ids, mask, cache, new_tokens: int, compiled: bool, device: str):
    options = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if compiled:
        compile_config = CompileConfig(fullgraph=False)
        compile_config._compile_all_devices = device == "cpu"
        options["compile_config"] = compile_config
    else:
        options["disable_compile"] = True
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, **options)
    sync(device)
    return time.perf_counter() - started, out[:, ids.shape[1]:]


def rewinding_generate(model, ids, mask, cache, compiled: bool, device: str, length: int):
    """generate(tokens) -> (seconds, new tokens) of one generate() over `cache`, which is rewound
    to `length` cached positions afterwards."""

    def generate(tokens: int):
        try:
            return generate_seconds(model, ids, mask, cache, tokens, compiled, device)
        finally:
            rewind(cache, length)

    return generate


def timed_decode(generate, new_tokens: int):
    """(seconds per decode step, seconds of generate()'s first forward, tokens) from
    rewinding_generate's `generate`: generate() of one token (its first forward, eager) and of
    new_tokens tokens, the step being the difference over new_tokens - 1."""
    first, _ = generate(1)
    total, tokens = generate(new_tokens)
    return (total - first) / (new_tokens - 1), first, tokens


def profile_step(generate, new_tokens: int, device: str) -> dict:
    """profile_counts of one decode step: the counts of generate(new_tokens) less those of
    generate(1), over new_tokens - 1 (rewinding_generate's `generate`)."""
    first = profile_counts(lambda: generate(1), 1, device)
    total = profile_counts(lambda: generate(new_tokens), 1, device)
    return {name: None if value is None else (value - first[name]) / (new_tokens - 1)
            for name, value in total.items()}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_counts(run, steps: int, device: str, trace: Optional[str] = None) -> dict:
    """Per step of `run()` under torch.profiler: GPU kernels, host-device syncs, scalar reads of
    device data (.item(), bool(tensor)) and the GPU's busy time (the union of kernel intervals).
    With `trace`, also writes the chrome trace there."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    if trace:
        prof.export_chrome_trace(trace)
    kernels, syncs, reads = [], 0, 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((event.time_range.start, event.time_range.end))
        elif event.name in SYNC_CALLS:
            syncs += 1
        elif event.name == "aten::_local_scalar_dense":
            reads += 1
    return {"kernels_per_step": len(kernels) / steps, "syncs_per_step": syncs / steps,
            "host_reads_per_step": reads / steps,
            "gpu_ms_per_step": _union_us(kernels) / 1e3 / steps if device == "cuda" else None}


def _union_us(intervals: list) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def sparse_calls(model) -> int:
    return model.gsa_runtime.total_stats().sparse_calls


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read + write), measured now."""
    if device != "cuda":
        return float("nan")
    source = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    sync(device)
    return 2 * 10 * source.numel() / (time.perf_counter() - started)


def kv_heads(model, layer: int) -> int:
    """KV heads the layer's cache holds on this device (this rank's under tensor parallelism)."""
    return model.gsa_runtime.sites[layer].shape.kv_heads


def weight_bytes(model) -> int:
    """Bytes of the weights on this device (this rank's shards under tensor parallelism)."""
    local = (p.to_local() if is_dtensor(p) else p for p in model.parameters())
    return sum(p.numel() * p.element_size() for p in local)


def floor_bytes(model, batch: int, length: int, path: str) -> float:
    """Bytes one decode step must read: weights, then each layer's K/V (selected blocks and codes
    in GSA's sparse layers)."""
    config = model.config
    total = weight_bytes(model)
    runtime = model.gsa_runtime
    for layer in range(config.num_hidden_layers):
        per_token = 2 * kv_heads(model, layer) * config.head_dim * model.dtype.itemsize * batch
        site = runtime.sites.get(layer)
        if path.startswith("gsa") and site is not None and site.policy != "dense":
            k = runtime.config.num_selected_blocks(layer, length)
            total += per_token * min(length, k * runtime.config.chunk_size)
            if site.policy == "sparse":
                total += batch * kv_heads(model, layer) * length * runtime.config.hash_bits // 8
        else:
            total += per_token * length
    return total


def run_shape(model, batch: int, prompt: int, args, device: str, bandwidth: float) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(prompt + batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device, generator=generator)
    mask = torch.ones_like(ids)
    rows = []
    groups = [(True, STATIC_PATHS)] + ([(False, EAGER_PATHS)] if prompt in args.dynamic_shapes else [])
    for compiled, paths in groups:
        if compiled:
            cache = StaticCache(config=model.config, max_cache_len=prompt + args.new_tokens)
        else:
            cache = DynamicCache(config=model.config)
        fill(model, cache, batch, prompt - 1, device, generator)
        results, busy = {}, {}
        order = [p for p in paths if p in args.paths]

        generate = rewinding_generate(model, ids, mask, cache, compiled, device, prompt - 1)

        def timed(path: str, warm: bool):
            try:
                with attention_path(model, path):
                    if warm:
                        generate(3)
                    calls = sparse_calls(model)
                    step, first, tokens = timed_decode(generate, args.new_tokens)
                    calls = sparse_calls(model) - calls
                    if warm and device == "cuda":  # more runs, profiled (not timed)
                        busy[path] = profile_step(generate, args.new_tokens, device)
            except Exception as exc:  # one path failing must not lose the others' numbers
                print(f"  {path}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                results[path] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                return
            best = results.get(path, {}).get("step", math.inf)
            if step < best:
                results[path] = {"step": step, "first": first, "tokens": tokens, "sparse_calls": calls}
            print(f"  {path}: {step * 1e3:.2f} ms/step, first forward {first * 1e3:.1f} ms", flush=True)

        for path in order:  # A B C ... warm and timed
            timed(path, warm=True)
        for path in reversed(order):  # ... C B A timed again
            if "error" not in results.get(path, {}):
                timed(path, warm=False)
        reference = results.get("dense_hf" if compiled else "dense_eager", {}).get("tokens")
        # Random weights leave near-tied logits, so two exact dense paths can pick different
        # tokens; gsa's dense kernel is the like-for-like reference of the sparse kernel.
        same_kernel = results.get("dense_gsa_kernel", {}).get("tokens")
        for path in order:
            result = results[path]
            row = {"batch": batch, "prompt": prompt, "path": path, "cache": "static" if compiled else "dynamic",
                   "compiled": compiled}
            if "error" in result:
                rows.append({**row, "error": result["error"]})
                continue
            ms = result["step"] * 1e3
            floor = floor_bytes(model, batch, prompt, path)
            row.update(ms_per_step=ms, tokens_per_s=batch / result["step"], first_forward_ms=result["first"] * 1e3,
                       sparse_calls=result["sparse_calls"], floor_gb=floor / 1e9,
                       floor_share=(floor / bandwidth * 1e3) / ms if bandwidth == bandwidth else None)
            row.update(busy.get(path, {}))
            if row.get("gpu_ms_per_step") is not None:  # profiled run's GPU time over the timed step
                row["gpu_busy_share"] = row["gpu_ms_per_step"] / ms
            if reference is not None:
                row["agree"] = float((result["tokens"] == reference).all(-1).float().mean())
            if same_kernel is not None:
                row["agree_gsa_kernel"] = float((result["tokens"] == same_kernel).all(-1).float().mean())
            rows.append(row)
        del cache, generate  # generate holds the cache too
        if device == "cuda":
            torch.cuda.empty_cache()
    strongest = min((r for r in rows if r.get("path") in EXACT_DENSE and "ms_per_step" in r),
                    key=lambda r: r["ms_per_step"], default=None)
    for row in rows:
        if strongest is not None and "ms_per_step" in row:
            row["vs_strongest_dense"] = strongest["ms_per_step"] / row["ms_per_step"]
            row["strongest_dense"] = strongest["path"]
    return rows


def agreement(model, args, device: str) -> dict:
    """GSA with a budget covering every block against dense_hf, static compiled path."""
    batch, prompt = args.agreement
    config = model.gsa_runtime.config
    model.gsa_runtime.config = config.replace(budget_tokens=prompt + args.new_tokens)
    try:
        saved = args.paths
        args.paths = ("gsa", "dense_hf", "dense_gsa_kernel")
        rows = run_shape(model, batch, prompt, args, device, float("nan"))
    finally:
        args.paths = saved
        model.gsa_runtime.config = config
    gsa = next(r for r in rows if r["path"] == "gsa")
    return {"batch": batch, "prompt": prompt, "budget_tokens": prompt + args.new_tokens, "agree": gsa.get("agree"),
            "agree_gsa_kernel": gsa.get("agree_gsa_kernel"), "error": gsa.get("error")}


def table(rows: list[dict]) -> str:
    header = ["batch", "prompt", "path", "ms/step", "tok/s", "first forward ms", "x strongest dense", "floor GB",
              "floor share",
              "GPU busy", "sparse calls", "agree", "agree (gsa kernel)"]
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append([r["batch"], r["prompt"], r["path"], "failed", r["error"][:60]] + [""] * (len(header) - 5))
            continue
        lines.append([r["batch"], r["prompt"], r["path"], f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['first_forward_ms']:.1f}",
                      f"{r.get('vs_strongest_dense', float('nan')):.2f}", f"{r['floor_gb']:.1f}",
                      "" if r.get("floor_share") is None else f"{r['floor_share']:.0%}",
                      "" if r.get("gpu_busy_share") is None else f"{r['gpu_busy_share']:.0%}", r["sparse_calls"],
                      "" if r.get("agree") is None else f"{r['agree']:.2f}",
                      "" if r.get("agree_gsa_kernel") is None else f"{r['agree_gsa_kernel']:.2f}"])
    return format_table(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["batch"], r["prompt"]) for r in rows})
    paths = [p for p in STATIC_PATHS + EAGER_PATHS if any(r["path"] == p for r in rows)]
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(paths), 1)
    for i, name in enumerate(paths):
        values = [next((r["tokens_per_s"] for r in rows if (r["batch"], r["prompt"]) == s and r["path"] == name
                        and "tokens_per_s" in r), 0) for s in shapes]
        axis.bar([j + i * width for j in range(len(shapes))], values, width, label=name)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    axis.set_xticklabels([f"batch {b}\n{p // 1024}K" for b, p in shapes])
    axis.set_ylabel("tokens/s (generate)")
    axis.legend(fontsize=7)
    axis.set_title("End-to-end decode, Llama-3.1-8B shape")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def add_run_arguments(parser: argparse.ArgumentParser, layers: int, shapes: str) -> None:
    """The options every end-to-end benchmark takes (this one and e2e_tp.py)."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--shapes", default=shapes, help="comma-separated BATCHxPROMPT")
    parser.add_argument("--paths", default=",".join(STATIC_PATHS + EAGER_PATHS))
    parser.add_argument("--dynamic-shapes", default="32768", help="prompt lengths that also run the eager paths")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget-tokens", type=int, default=2048)
    parser.add_argument("--agreement", default="", help="BATCHxPROMPT of a full-budget agreement run")


def parse_run_arguments(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (a step is timed after generate()'s first forward), "
                     f"got {args.new_tokens}")
    args.paths = tuple(p for p in args.paths.split(",") if p)
    args.dynamic_shapes = {int(p) for p in args.dynamic_shapes.split(",") if p}
    args.agreement = tuple(int(x) for x in args.agreement.split("x")) if args.agreement else None
    return args


def optimize_for_run(model, args):
    """The model under GSA at the run's budget (tiny runs: small blocks, thresholds 0, so the
    CPU smoke run is sparse too)."""
    overrides = dict(budget_tokens=args.budget_tokens)
    if args.tiny:
        overrides.update(chunk_size=16, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
    return gsa_compile.optimize(model, gsa_compile.GSAConfig.for_model(model, **overrides))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, layers=32, shapes="8x32768,8x65536,1x131072,4x131072")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test of the paths)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--out", default="e2e_out")
    args = parse_run_arguments(parser, argv)
    device = "cpu" if args.tiny else "cuda"
    os.makedirs(args.out, exist_ok=True)

    model = build_model(args.layers, args.tiny, device)
    model = optimize_for_run(model, args)
    print(model.gsa_report, flush=True)
    bandwidth = copy_bandwidth(device)
    report = {"model": {"layers": args.layers, **(TINY if args.tiny else LLAMA_31_8B)}, "device": device,
              "torch": torch.__version__, "copy_bandwidth_gbs": bandwidth / 1e9, "new_tokens": args.new_tokens,
              "budget_tokens": args.budget_tokens, "rows": []}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for shape in args.shapes.split(","):
        batch, prompt = (int(x) for x in shape.split("x"))
        print(f"batch {batch}, prompt {prompt}:", flush=True)
        report["rows"].extend(run_shape(model, batch, prompt, args, device, bandwidth))
        write_json(os.path.join(args.out, "e2e.json"), report)
    if args.agreement:
        report["agreement"] = agreement(model, args, device)
        print("full-budget agreement:", report["agreement"], flush=True)
    write_json(os.path.join(args.out, "e2e.json"), report)
    print(table(report["rows"]), flush=True)
    if args.plot:
        plot(report["rows"], os.path.join(args.out, "e2e.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
