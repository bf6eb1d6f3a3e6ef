"""Decode-step speed on the FX route: a Llama-3.1-8B-shaped decoder built from plain torch
modules (gsa_compile.capture.fx_examples.StaticCacheDecoder: layers owning static K/V caches
written by index_copy_, the unused tail masked), compiled with mode="reduce-overhead" (CUDA
graphs) over the same weights and caches: dense (Inductor; with the tail mask as the model is
written, and without it, which lets SDPA take its flash path with GQA: the strongest dense decode
here) and GSA (the "gsa" backend).

    python benchmarks/e2e_fx.py --out fx_out                       # H200: 32 layers, bf16, batch 8, 32K and 64K
    python benchmarks/e2e_fx.py --tiny --out /tmp/fx               # CPU smoke run of the same path

Plain modules rather than transformers' model: the FX route is for models the HF route does not
serve, and a hand-written static cache has nothing in its decode step that the host must read
(no cache bookkeeping in Python), so the graph dynamo captures is the whole step. The caches are
filled with random keys and values (the weights are random too) instead of a prefill; each timed
step decodes the token at position `prompt`, so every step does the same work on the same cache.
The variants alternate in ABBA order in one process; "agree" is the share of rows whose next token
(argmax) matches the masked dense step's. Default policy: the first 2 and last
3 layers dense, a 2048-token budget in the others. Prints a table and writes e2e_fx.json."""

import argparse
import functools
import os
import sys
import time

import torch
from torch._dynamo.utils import counters

from gsa_compile import GSAConfig
from gsa_compile.capture.dynamo_backend import gsa_backend
from gsa_compile.capture.fx_examples import StaticCacheDecoder
from gsa_compile.tables import format_table, write_json

LLAMA_31_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
TINY = dict(hidden=128, intermediate=256, heads=8, kv_heads=2, head_dim=16, vocab=1000)
H200_BANDWIDTH_GBS = 4800.0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args, batch: int, prompt: int, device: str) -> StaticCacheDecoder:
    shape = TINY if args.tiny else LLAMA_31_8B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    with torch.random.fork_rng(devices=[] if device == "cpu" else None):
        torch.manual_seed(0)
        model = StaticCacheDecoder(layers=args.layers, max_len=prompt + args.tail, batch=batch, dtype=dtype,
                                   device=device, **shape).eval()
        with torch.no_grad():
            for layer in model.layers:
                # Random keys and values in place of a prefill: the written part and the masked tail.
                layer.key_cache.normal_()
                layer.value_cache.normal_()
    return model


def gsa_config(args, model: StaticCacheDecoder) -> GSAConfig:
    attention = model.layers[0]
    thresholds = dict(cpu_seq_len_threshold=0, cpu_concurrency_threshold=0) if args.tiny else {}
    return GSAConfig(num_hidden_layers=len(model.layers), head_dim=attention.head_dim,
                     hash_bits=args.hash_bits, chunk_size=args.chunk_size, budget_tokens=args.budget, **thresholds)


def bytes_per_step(model: StaticCacheDecoder, config: GSAConfig, batch: int, keys: int, sparse: bool) -> int:
    """Bytes a decode step must read at least: every weight once, then K and V of every key
    (dense layers, or every layer when not sparse) or of the budget (sparse layers)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = weights
    for index, layer in enumerate(model.layers):
        per_key = 2 * layer.kv_heads * layer.head_dim * layer.key_cache.element_size() * batch
        read = keys
        if sparse and config.layer_policy(index) != "dense":
            read = min(keys, config.budget_tokens)
        total += per_key * read
    return total


@torch.no_grad()
def measure(args, batch: int, prompt: int, device: str) -> list:
    model = build(args, batch, prompt, device)
    config = gsa_config(args, model)
    mode = None if device == "cpu" else "reduce-overhead"
    reports = []
    dense = torch.compile(model, mode=mode)
    gsa = torch.compile(model, backend=functools.partial(gsa_backend, options={"config": config, "reports": reports}),
                        mode=mode)
    runners = {
        "dense": dense,
        # The same cache without the tail mask: SDPA's flash path with GQA, the strongest dense here.
        "dense unmasked": functools.partial(dense, mask_tail=False),
        "gsa": gsa,
    }
    token = torch.randint(0, model.embed.num_embeddings, (batch, 1), device=device,
                          generator=torch.Generator(device).manual_seed(1))
    position = torch.tensor([prompt], device=device)
    logits = {}
    counters.clear()
    for name, run in runners.items():
        for _ in range(args.warmup):  # compile, then CUDA graph recording
            logits[name] = run(token, position).float().clone()
    sync(device)
    compiled = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if compiled["graph_breaks"] or (mode and compiled["cudagraph_skips"]):
        print(f"warning: batch {batch} prompt {prompt}: {compiled}", file=sys.stderr)
    times = {name: [] for name in runners}
    names = list(runners)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order + order[::-1]:
            run = runners[name]
            sync(device)
            started = time.perf_counter()
            for _ in range(args.steps):
                run(token, position)
            sync(device)
            times[name].append((time.perf_counter() - started) / args.steps)
    compiled["graphs_after_timing"] = counters["stats"]["unique_graphs"]
    keys = prompt + 1
    rows = []
    for name in runners:
        step = sorted(times[name])[len(times[name]) // 2]
        floor = bytes_per_step(model, config, batch, keys, sparse=name == "gsa")
        floor_ms = floor / (args.bandwidth_gbs * 1e9) * 1e3
        rows.append({
            "path": f"fx {name}", "mode": mode or "default", "batch": batch, "prompt": prompt,
            "ms_per_step": step * 1e3, "tokens_per_s": batch / step,
            "bytes_floor_gb": floor / 1e9, "floor_ms": floor_ms, "floor_share": floor_ms / (step * 1e3),
            "ms_per_step_all": [t * 1e3 for t in times[name]],
        })
    gsa_row = rows[-1]
    gsa_row["speedup_vs_dense"] = rows[0]["ms_per_step"] / gsa_row["ms_per_step"]
    gsa_row["speedup_vs_strongest_dense"] = min(row["ms_per_step"] for row in rows[:-1]) / gsa_row["ms_per_step"]
    gsa_row["next_token_agreement"] = (logits["gsa"].argmax(-1) == logits["dense"].argmax(-1)).float().mean().item()
    gsa_row["max_abs_logit_diff"] = (logits["gsa"] - logits["dense"]).abs().max().item()
    gsa_row["compiled"] = compiled
    gsa_row["sites"] = [(site.layer, site.policy, site.note) for site in reports[-1].sites] if reports else []
    del runners, dense, gsa, model
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU (smoke run)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, tiny 6)")
    parser.add_argument("--configs", default=None,
                        help="batch x prompt list, e.g. 8x32768,8x65536 (default; tiny: 2x256)")
    parser.add_argument("--tail", type=int, default=32, help="masked cache slots after the prompt")
    parser.add_argument("--budget", type=int, default=None, help="GSA tokens per sparse layer (default 2048, tiny 64)")
    parser.add_argument("--chunk-size", type=int, default=None, help="GSA block size (default 128, tiny 16)")
    parser.add_argument("--hash-bits", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="decode steps per timed run (default 20, tiny 3)")
    parser.add_argument("--rounds", type=int, default=None, help="ABBA rounds (default 3, tiny 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bandwidth-gbs", type=float, default=H200_BANDWIDTH_GBS,
                        help="memory bandwidth for the bytes floor (GB/s)")
    parser.add_argument("--out", default="e2e_fx_out")
    return parser


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    tiny = args.tiny
    args.layers = args.layers or (6 if tiny else 32)
    args.budget = args.budget or (64 if tiny else 2048)
    args.chunk_size = args.chunk_size or (16 if tiny else 128)
    args.steps = args.steps or (3 if tiny else 20)
    args.rounds = args.rounds or (1 if tiny else 3)
    args.configs = args.configs or ("2x256" if tiny else "8x32768,8x65536")
    return args


def fx_rows(batch: int, prompt: int, **options) -> list:
    """The rows of one batch x prompt point (for other benchmarks): options are this script's
    flags with underscores (tiny=True, layers=8, budget=2048, steps=20, ...)."""
    args = argument_parser().parse_args([])
    vars(args).update(options)
    args = with_defaults(args)
    return measure(args, batch, prompt, "cpu" if args.tiny else "cuda")


def main(argv=None) -> int:
    args = with_defaults(argument_parser().parse_args(argv))
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    rows = []
    for item in args.configs.split(","):
        batch, prompt = (int(part) for part in item.lower().split("x"))
        rows.extend(measure(args, batch, prompt, device))
    table = [("path", "mode", "batch", "prompt", "ms/step", "tok/s", "floor ms", "floor share", "vs dense",
              "vs strongest", "agree")]
    for row in rows:
        gsa_only = "speedup_vs_dense" in row
        table.append((row["path"], row["mode"], row["batch"], row["prompt"], f"{row['ms_per_step']:.2f}",
                      f"{row['tokens_per_s']:.0f}", f"{row['floor_ms']:.2f}", f"{row['floor_share']:.0%}",
                      f"{row['speedup_vs_dense']:.2f}x" if gsa_only else "",
                      f"{row['speedup_vs_strongest_dense']:.2f}x" if gsa_only else "",
                      f"{row['next_token_agreement']:.0%}" if gsa_only else ""))
    print(format_table(table))
    os.makedirs(args.out, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    write_json(os.path.join(args.out, "e2e_fx.json"), {
        "device": device_name, "torch": torch.__version__, "args": vars(args), "rows": rows})
    print(f"wrote {os.path.join(args.out, 'e2e_fx.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
