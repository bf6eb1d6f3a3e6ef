"""CPU benchmark of one GSA decode attention vs dense SDPA (enable_gqa), side by side.

    python benchmarks/cpu_op.py                      # default shape: B=1, 32/8 heads, d=128, fp32
    python benchmarks/cpu_op.py --keys 8192 32768 --out out/cpu_op

GSA is timed with codes already cached (score + select + attend), as in decoding. Each
repetition runs dense and GSA back to back, so machine noise hits both alike. Prints a table,
writes JSON and a PNG plot."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from gsa_compile import functional as F
from gsa_compile.tables import format_table, write_json


def attention_bytes(batch, kv_heads, keys, dim, value_dim, itemsize, code_bytes=0, selected_tokens=None):
    """Bytes one decode step must read: all K/V for dense; codes + the selected K/V for GSA."""
    tokens = keys if selected_tokens is None else min(selected_tokens, keys)
    return batch * kv_heads * (tokens * (dim + value_dim) * itemsize + keys * code_bytes)


def measure(args, keys):
    gen = torch.Generator().manual_seed(keys)
    dtype = getattr(torch, args.dtype)
    kv_heads = args.q_heads // args.groups
    query = torch.randn(args.batch, args.q_heads, 1, args.dim, generator=gen).to(dtype)
    key = torch.randn(args.batch, kv_heads, keys, args.dim, generator=gen).to(dtype)
    value = torch.randn(args.batch, kv_heads, keys, args.dim, generator=gen).to(dtype)
    weight = F.hash_weights(kv_heads, args.dim, args.bits, seed=0)
    codes = F.encode(key, weight)

    def gsa():
        return F.gsa_attention(query, key, value, weight, key_codes=codes, chunk_size=args.chunk,
                               budget_tokens=args.budget_tokens)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    for _ in range(args.warmup):
        gsa(), dense()
    gsa_times, dense_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        dense()
        dense_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        gsa()
        gsa_times.append(time.perf_counter() - start)
    k = F.num_selected_blocks(keys, args.chunk, budget_tokens=args.budget_tokens)
    itemsize = query.element_size()
    return {
        "keys": keys,
        "selected_blocks": k,
        "gsa_ms": statistics.median(gsa_times) * 1e3,
        "dense_ms": statistics.median(dense_times) * 1e3,
        "gsa_bytes": attention_bytes(args.batch, kv_heads, keys, args.dim, args.dim, itemsize, args.bits // 8,
                                     k * args.chunk),
        "dense_bytes": attention_bytes(args.batch, kv_heads, keys, args.dim, args.dim, itemsize),
        "max_abs_error_vs_dense": float((gsa() - dense()).abs().max()),
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [r["keys"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(keys, [r["dense_ms"] for r in results], "o-", label="dense SDPA (enable_gqa)")
    ax.plot(keys, [r["gsa_ms"] for r in results], "o-", label="GSA (codes cached)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("keys in cache")
    ax.set_ylabel("median ms per decode attention")
    ax.set_title("CPU decode attention, one layer")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--budget-tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--out", default="out/cpu_op", help="folder for results.json and plot.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for keys in args.keys:
        results.append(measure(args, keys))
        print(f"measured {keys} keys", flush=True)
    rows = [("keys", "k blocks", "dense ms", "GSA ms", "speedup", "dense MB", "GSA MB", "max |GSA-dense|")]
    for r in results:
        rows.append((r["keys"], r["selected_blocks"], f"{r['dense_ms']:.2f}", f"{r['gsa_ms']:.2f}",
                     f"{r['dense_ms'] / r['gsa_ms']:.2f}x", f"{r['dense_bytes'] / 1e6:.1f}",
                     f"{r['gsa_bytes'] / 1e6:.1f}", f"{r['max_abs_error_vs_dense']:.3g}"))
    print(f"B={args.batch} heads={args.q_heads}/{args.q_heads // args.groups} d={args.dim} {args.dtype} "
          f"chunk={args.chunk} budget={args.budget_tokens} tokens, threads={torch.get_num_threads()}")
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"), {"config": vars(args), "results": results})
    plot(results, os.path.join(args.out, "plot.png"))
    print(f"wrote {args.out}/results.json and {args.out}/plot.png")
    return results


if __name__ == "__main__":
    main()
