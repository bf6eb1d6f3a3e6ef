"""One MLA layer's decode step: latent-space GSA vs expanded-key GSA vs dense, and the bytes each moves.

    python benchmarks/mla_bench.py --out bench_out/mla          # H200: DeepSeek-V3 geometry (128 heads,
                                                                # kv_lora 512, rope 64, nope 128, value 128),
                                                                # 32K and 128K keys, batch 1 and 8, 2048 tokens
    python benchmarks/mla_bench.py --device cpu --heads 16 --nope 32 --value 32 --keys 2048,4096 \\
        --batches 1,2 --budget 512 --out bench_out/mla_cpu      # the same measurement, small, on the CPU

Per (batch, keys), one bf16 layer: latents c_kv [B, 1, L, kv_lora] and k_rope [B, 1, L, rope], the
per-head keys [B, H, L, nope + rope] and values [B, H, L, value] expanded from them through a
random kv_b_proj (what transformers' MLA modules attend), and one decode query [B, H, 1, nope + rope].

- dense: SDPA over the expanded keys and values; dense split-kv: gsa's sparse attention kernel
  over every block (the split-KV decode the HF route runs for masked dense decodes); "vs dense"
  is against the faster of the two;
- gsa expanded: codes of every head's expanded key (72 bytes per token and head), selection per
  (row, head), sparse attention over the selected blocks;
- gsa latent: codes of the latent key [c_kv | k_rope] (72 bytes per token), the query absorbed
  through W_UK, one selection per row shared by all heads (gsa_compile.mla), the same sparse
  attention.

Times are medians (eager and CUDA-graph replay on CUDA; eager wall time on the CPU); bytes count
what each version must read (codes, W_UK for the absorption, selected or all keys and values,
block scores) and the floor is bytes / measured copy bandwidth. The latent selection is checked
against top-k of the latent similarity written out from the codes unless --no-check.
Prints a table, writes <out>/mla_bench.json and <out>/mla_bench.png."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

from gsa_compile import functional as F
from gsa_compile import mla
from gsa_compile.config import GSAConfig
from gsa_compile.hashing import layer_hash_weight
from gsa_compile.kernels import reference
from gsa_compile.tables import format_table

CHUNK = 128
MUST_SELECT = (0, -2, -1)
VERSIONS = ("dense", "dense split-kv", "gsa expanded", "gsa latent")
# Expansion of the latents into per-head keys and values, this many tokens at a time.
EXPAND_TOKENS = 8192


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--kv-lora", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--nope", type=int, default=128)
    parser.add_argument("--value", type=int, default=128)
    parser.add_argument("--keys", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--budget", type=int, default=2048, help="tokens each selection keeps")
    parser.add_argument("--out", default="bench_out/mla")
    parser.add_argument("--no-check", action="store_true", help="skip the latent selection check")
    return parser.parse_args(argv)


class Timer:
    """Medians of a callable on one device: triton's do_bench and CUDA-graph replays on CUDA,
    wall time after a warm-up on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def eager_ms(self, fn) -> float:
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def graph_ms(self, fn):
        """Median of CUDA-graph replays of fn (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.eager_ms(graph.replay)

    def best_ms(self, fn) -> dict:
        eager = self.eager_ms(fn)
        graph = self.graph_ms(fn)
        return {"eager_ms": eager, "graph_ms": graph, "ms": eager if graph is None else min(eager, graph)}

    def copy_bandwidth(self) -> float:
        """Bytes read + written per second by a large device copy."""
        size = (1 << 30) if self.device.type == "cuda" else (1 << 27)
        source = torch.empty(size, dtype=torch.uint8, device=self.device).random_()
        target = torch.empty_like(source)
        ms = self.eager_ms(lambda: target.copy_(source))
        return 2 * size / (ms * 1e-3)


def mla_config(args) -> GSAConfig:
    """A DeepSeek-style MLA config: 512 latent bits, 64 rope bits (or the dims given)."""
    bits = lambda dims: 8 * -(-dims // 8)  # noqa: E731
    return GSAConfig(num_hidden_layers=2, is_mla=True, head_dim=args.kv_lora + args.rope,
                     hash_bits=bits(args.kv_lora) + bits(args.rope), kv_lora_rank=args.kv_lora,
                     qk_rope_head_dim=args.rope, hash_bits_kv_lora=bits(args.kv_lora), hash_bits_qk_rope=bits(args.rope),
                     top_k_ratio_per_layer=[1, 0.5], top_k_index_reuse=[-1, -1], budget_tokens=args.budget)


def layer_inputs(args, layout: mla.LatentLayout, batch: int, num_keys: int, device, generator):
    """Latents, the keys and values expanded from them (as transformers' expand_kv builds them),
    kv_b_proj's weight and a decode query, bf16."""
    dtype = torch.bfloat16

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    kv_b = randn(layout.heads * (layout.nope_dim + layout.value_dim), layout.latent_dim, scale=layout.latent_dim ** -0.5)
    c_kv = randn(batch, 1, num_keys, layout.latent_dim)
    k_rope = randn(batch, 1, num_keys, layout.rope_dim)
    key = torch.empty(batch, layout.heads, num_keys, layout.nope_dim + layout.rope_dim, dtype=dtype, device=device)
    value = torch.empty(batch, layout.heads, num_keys, layout.value_dim, dtype=dtype, device=device)
    for start in range(0, num_keys, EXPAND_TOKENS):
        end = min(num_keys, start + EXPAND_TOKENS)
        expanded = (c_kv[:, 0, start:end] @ kv_b.T).view(batch, end - start, layout.heads, -1).transpose(1, 2)
        key[:, :, start:end, : layout.nope_dim] = expanded[..., : layout.nope_dim]
        key[:, :, start:end, layout.nope_dim:] = k_rope[:, :, start:end]
        value[:, :, start:end] = expanded[..., layout.nope_dim:]
        del expanded
    query = randn(batch, layout.heads, 1, layout.nope_dim + layout.rope_dim)
    return c_kv, k_rope, key, value, kv_b, query


def shape_rows(args, timer: Timer, bandwidth: float, batch: int, num_keys: int, generator) -> list[dict]:
    device = timer.device
    layout = mla.LatentLayout(args.heads, args.nope, args.rope, args.value, args.kv_lora)
    config = mla_config(args)
    c_kv, k_rope, key, value, kv_b, query = layer_inputs(args, layout, batch, num_keys, device, generator)
    w_uk = layout.key_up_projection(kv_b)
    latent_weight = layer_hash_weight(config, 1, 1, layout.code_dim).to(device)
    expanded_weight = layer_hash_weight(config, 1, layout.heads, layout.nope_dim + layout.rope_dim).to(device)
    latent_codes = F.encode(mla.latent_keys(c_kv, k_rope), latent_weight)
    expanded_codes = F.encode(key, expanded_weight)
    scale = (layout.nope_dim + layout.rope_dim) ** -0.5
    k = F.num_selected_blocks(num_keys, CHUNK, budget_tokens=args.budget, must_select=MUST_SELECT)
    n_blocks = -(-num_keys // CHUNK)

    item = key.element_size()
    token_kv_bytes = layout.heads * (key.shape[-1] + value.shape[-1]) * item  # one token, every head
    io_bytes = batch * layout.heads * (query.shape[-1] + value.shape[-1]) * item
    selected_bytes = batch * min(k * CHUNK, num_keys) * token_kv_bytes
    latent_code_bytes = latent_codes.numel()
    expanded_code_bytes = expanded_codes.numel()
    w_uk_bytes = w_uk.numel() * w_uk.element_size()

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)

    def latent_select():
        return mla.latent_select_blocks(query, w_uk, layout.nope_dim, latent_codes, latent_weight, None, None, CHUNK,
                                        k, MUST_SELECT, "max")

    def expanded_select():
        return F.select_blocks(query, expanded_codes, expanded_weight, chunk_size=CHUNK, num_blocks=k,
                               must_select=MUST_SELECT)

    def attend(blocks):
        return F.sparse_attention(query, key, value, blocks, chunk_size=CHUNK, scale=scale)

    every_block = torch.arange(n_blocks, dtype=torch.int32, device=device).expand(batch, layout.heads, -1).contiguous()
    dense_bytes = batch * num_keys * token_kv_bytes + io_bytes
    versions = {
        "dense": (dense, dense_bytes, None),
        "dense split-kv": (lambda: attend(every_block), dense_bytes, None),
        "gsa expanded": (lambda: attend(expanded_select()),
                         expanded_code_bytes + selected_bytes + io_bytes + batch * layout.heads * n_blocks * 8,
                         expanded_select),
        "gsa latent": (lambda: attend(latent_select()),
                       latent_code_bytes + w_uk_bytes + selected_bytes + io_bytes + batch * n_blocks * 8, latent_select),
    }
    rows = []
    blocks = latent_select()
    attend_ms = timer.best_ms(lambda: attend(blocks))["ms"]
    for version, (fn, bytes_moved, select) in versions.items():
        timing = timer.best_ms(fn)
        row = {"version": version, "batch": batch, "keys": num_keys, "budget_tokens": args.budget, "blocks": k,
               **timing, "bytes": bytes_moved, "floor_ms": bytes_moved / bandwidth * 1e3,
               "code_bytes": {"gsa expanded": expanded_code_bytes, "gsa latent": latent_code_bytes}.get(version, 0)}
        if select is not None:
            row["select_ms"] = timer.best_ms(select)["ms"]
            row["attend_ms"] = attend_ms
        if version == "gsa latent":  # the query's absorption through W_UK, inside select_ms
            row["absorb_ms"] = timer.best_ms(lambda: mla.absorb_query(query, w_uk, layout.nope_dim))["ms"]
        rows.append(row)
    dense_ms = min(row["ms"] for row in rows if row["version"].startswith("dense"))
    for row in rows:
        row["speedup"] = dense_ms / row["ms"]
        row["floor_fraction"] = row["floor_ms"] / row["ms"]
    if not args.no_check:
        rows[-1]["selection_equals_reference"] = check_latent_selection(
            query, w_uk, layout, latent_codes, latent_weight, blocks, k)
    del c_kv, k_rope, key, value, latent_codes, expanded_codes
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def check_latent_selection(query, w_uk, layout, latent_codes, weight, blocks, k) -> bool:
    """The selection equals top-k (block max, must-select first) of the latent similarity written
    out from the codes: the absorbed query's codes against the latent codes, +-1 agreements summed
    over heads and bits in float64. Starting from the codes leaves out projection rounding, in
    which a GPU's matmuls and the CPU's may differ within float32 rounding of zero."""
    from gsa_compile.kernels.common import unpack_codes

    absorbed = mla.absorb_query(query, w_uk, layout.nope_dim)
    query_signs = unpack_codes(F.encode(absorbed, weight)[:, :, 0]).double() * 2 - 1  # [B, H, R]
    batch, _, num_keys, _ = latent_codes.shape
    similarity = torch.empty(batch, num_keys, dtype=torch.float64, device=latent_codes.device)
    for start in range(0, num_keys, EXPAND_TOKENS):
        key_signs = unpack_codes(latent_codes[:, 0, start:start + EXPAND_TOKENS]).double() * 2 - 1  # [B, l, R]
        similarity[:, start:start + EXPAND_TOKENS] = torch.einsum("bhr,blr->bl", query_signs, key_signs)
    expected = reference.select_from_similarity(similarity[:, None], None, None, CHUNK, k, list(MUST_SELECT), "max",
                                                "per_head")
    return bool(torch.equal(blocks[:, :1].cpu(), expected.cpu()))


def table(rows) -> str:
    header = ("version", "batch", "keys", "median us", "graph us", "vs dense", "select us", "MB moved", "codes MB",
              "floor us", "% of floor")
    lines = [header]
    for r in rows:
        graph = "" if r["graph_ms"] is None else f"{r['graph_ms'] * 1e3:.1f}"
        select = f"{r['select_ms'] * 1e3:.1f}" if "select_ms" in r else ""
        lines.append((r["version"], r["batch"], r["keys"], f"{r['eager_ms'] * 1e3:.1f}", graph, f"{r['speedup']:.2f}x",
                      select, f"{r['bytes'] / 1e6:.1f}", f"{r['code_bytes'] / 1e6:.2f}", f"{r['floor_ms'] * 1e3:.1f}",
                      f"{r['floor_fraction'] * 100:.0f}%"))
    return format_table(lines)


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed; no plot written")
        return
    shapes = sorted({(r["batch"], r["keys"]) for r in rows})
    versions = list(dict.fromkeys(r["version"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(shapes) + 3, 4.5))
    width = 0.8 / len(versions)
    for i, version in enumerate(versions):
        times = [next(r["ms"] * 1e3 for r in rows if (r["batch"], r["keys"]) == shape and r["version"] == version)
                 for shape in shapes]
        ax.bar([s + i * width for s in range(len(shapes))], times, width, label=version)
    ax.set_xticks([s + width * (len(versions) - 1) / 2 for s in range(len(shapes))])
    ax.set_xticklabels([f"batch {b}\n{keys // 1024}K keys" for b, keys in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("median us per layer decode step")
    ax.set_title(f"one MLA layer ({rows[0]['budget_tokens']}-token budget)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    timer = Timer(device)
    bandwidth = timer.copy_bandwidth()
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    with torch.no_grad():
        for batch in [int(b) for b in args.batches.split(",")]:
            for num_keys in [int(n) for n in args.keys.split(",")]:
                rows += shape_rows(args, timer, bandwidth, batch, num_keys, generator)
                print(table(rows[-len(VERSIONS):]), flush=True)
    environment = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth, "chunk": CHUNK,
                   "must_select": list(MUST_SELECT), "dtype": "bfloat16",
                   "geometry": {name: getattr(args, name) for name in ("heads", "kv_lora", "rope", "nope", "value")}}
    print(table(rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mla_bench.json"), "w") as handle:
        json.dump({"environment": environment, "rows": rows}, handle, indent=2)
    plot(rows, os.path.join(args.out, "mla_bench.png"))
    checks = [r["selection_equals_reference"] for r in rows if "selection_equals_reference" in r]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
