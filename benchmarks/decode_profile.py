"""Where a decode step's time goes, for GSA and dense on the same model and cache: host time per
attention call (eager), kernel launches and host-device syncs per step, and the share of the
step the GPU is busy. The model and cache are those of benchmarks/e2e_generate.py.

    python benchmarks/decode_profile.py --out profile_out                 # H200: batch 8, 32K
    python benchmarks/decode_profile.py --tiny --out /tmp/profile         # CPU smoke run

Rows (path x cache):
- gsa_eager / dense_eager: eager generate() over a dynamic cache. Host time of every attention
  call is timed (perf_counter around the attention function: on CUDA the kernels run
  asynchronously, so this is the host's own work) and reported per sparse and per dense layer.
- gsa / dense_gsa_kernel: static cache + transformers' auto-compile (CUDA graphs); attention
  calls are inside the graph, so only the per-step figures apply.
ms/step is a decode step after generate()'s first forward (benchmarks/e2e_generate.py says how
it is timed). Per step, from torch.profiler over generate(): GPU kernels launched, host-device syncs
(cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize), scalar reads of device
data (.item(), bool(tensor)), and the GPU-busy share (GPU time of a step, the union of kernel
intervals, over its timed ms/step; well below 100% means the step waits on the host). Prints a
table, writes profile.json, with --plot profile.png and with --trace a chrome trace per path.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

import torch
from transformers import AttentionInterface, DynamicCache, StaticCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e_generate as e2e  # noqa: E402
from gsa_compile.tables import format_table, write_json  # noqa: E402

TRACE_TOKENS = 3
PATHS = (("gsa_eager", False), ("dense_eager", False), ("gsa", True), ("dense_gsa_kernel", True))


@contextlib.contextmanager
def timed_attention(model, seconds: dict):
    """Time every call of the attention function the model runs now, by layer."""
    name = model.config._attn_implementation
    original = AttentionInterface()[name]

    def timed(module, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(module, *args, **kwargs)
        finally:
            seconds[getattr(module, "layer_idx", -1)].append(time.perf_counter() - started)

    AttentionInterface.register(name, timed)
    try:
        yield
    finally:
        AttentionInterface.register(name, original)


def layer_host_ms(model, seconds: dict) -> dict:
    """Mean host ms per call of sparse-policy and of dense layers (decode calls only: the first
    call of each layer, the one-token prompt step, is dropped)."""
    sites = model.gsa_runtime.sites
    groups = collections.defaultdict(list)
    for layer, values in seconds.items():
        site = sites.get(layer)
        kind = "sparse" if site is not None and site.policy != "dense" else "dense"
        groups[kind].extend(values[1:])
    return {f"host_ms_{kind}_layer": 1e3 * sum(v) / len(v) for kind, v in groups.items() if v}


def profile_path(model, path: str, compiled: bool, batch: int, prompt: int, args, device: str) -> dict:
    generator = torch.Generator(device=device).manual_seed(prompt + batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device, generator=generator)
    mask = torch.ones_like(ids)
    if compiled:
        cache = StaticCache(config=model.config, max_cache_len=prompt + args.new_tokens)
    else:
        cache = DynamicCache(config=model.config)
    e2e.fill(model, cache, batch, prompt - 1, device, generator)

    generate = e2e.rewinding_generate(model, ids, mask, cache, compiled, device, prompt - 1)
    row = {"batch": batch, "prompt": prompt, "path": path, "cache": "static" if compiled else "dynamic"}
    with e2e.attention_path(model, path):
        generate(3)  # warm-up (compiles the static paths)
        step, first, _ = min((e2e.timed_decode(generate, args.new_tokens) for _ in range(2)), key=lambda r: r[0])
        row.update(ms_per_step=1e3 * step, first_forward_ms=1e3 * first)
        if not compiled:
            seconds = collections.defaultdict(list)
            with timed_attention(model, seconds):
                generate(args.new_tokens)
            row.update(layer_host_ms(model, seconds))
        row.update(e2e.profile_step(generate, args.new_tokens, device))
        if args.trace:  # a short run: a trace of every step of a 32-layer model runs to hundreds of MB
            e2e.profile_counts(lambda: generate(TRACE_TOKENS), TRACE_TOKENS, device,
                               os.path.join(args.out, f"trace_{path}.json"))
        if row["gpu_ms_per_step"] is not None:
            row["gpu_busy_share"] = row["gpu_ms_per_step"] / row["ms_per_step"]
    del cache, generate  # generate holds the cache too
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list) -> str:
    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [["batch", "prompt", "path", "cache", "ms/step", "host ms/sparse layer", "host ms/dense layer",
              "kernels/step", "syncs/step", "host reads/step", "GPU busy"]]
    for r in rows:
        lines.append([r["batch"], r["prompt"], r["path"], r["cache"], cell(r["ms_per_step"], ".2f"),
                      cell(r.get("host_ms_sparse_layer"), ".3f"), cell(r.get("host_ms_dense_layer"), ".3f"),
                      cell(r["kernels_per_step"], ".0f"), cell(r["syncs_per_step"], ".1f"),
                      cell(r["host_reads_per_step"], ".1f"), cell(r.get("gpu_busy_share"), ".0%")])
    return format_table(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['path']}\n{r['cache']}" for r in rows]
    axis.bar(labels, [r["ms_per_step"] for r in rows], color="#888")
    busy = [r.get("gpu_ms_per_step") or 0 for r in rows]
    axis.bar(labels, busy, color="#3a7", label="GPU busy")
    axis.set_ylabel("ms per decode step")
    axis.legend()
    axis.set_title(f"Decode step, batch {rows[0]['batch']}, {rows[0]['prompt'] // 1024}K prompt")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shape", default="8x32768", help="BATCHxPROMPT")
    parser.add_argument("--paths", default=",".join(p for p, _ in PATHS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget-tokens", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--trace", action="store_true", help=f"also write a chrome trace of {TRACE_TOKENS} tokens per path")
    parser.add_argument("--out", default="profile_out")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    os.makedirs(args.out, exist_ok=True)
    batch, prompt = (int(x) for x in args.shape.split("x"))
    wanted = set(args.paths.split(","))

    model = e2e.build_model(args.layers, args.tiny, device)
    model = e2e.optimize_for_run(model, args)
    report = {"device": device, "torch": torch.__version__, "layers": args.layers, "new_tokens": args.new_tokens,
              "budget_tokens": args.budget_tokens, "rows": []}
    for path, compiled in PATHS:
        if path in wanted:
            print(f"{path}:", flush=True)
            report["rows"].append(profile_path(model, path, compiled, batch, prompt, args, device))
            write_json(os.path.join(args.out, "profile.json"), report)
    print(table(report["rows"]), flush=True)
    if args.plot and report["rows"]:
        plot(report["rows"], os.path.join(args.out, "profile.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
