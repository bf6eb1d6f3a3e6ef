"""`gsa-compile bench`: decode attention on a CUDA GPU, GSA against its alternatives, side by
side in one process.

Versions, all on the same inputs (bf16, 32 query / 8 KV heads, d 128 unless told):
- dense:  torch SDPA with enable_gqa (the fast path, reads all of K and V);
- gsa:    the Triton kernels with codes already cached: query encode + block scores + top-k
          + sparse decode attention (eager, and replayed from a CUDA graph);
- flex:   FlexAttention (compiled) with a BlockMask of the same selection (attention only);
- naive:  PyTorch gather: unpacked +-1 codes, einsum scores, topk, gather, SDPA.
For each it reports the median time, the speedup over dense, the bytes that version must
move, and the fraction of the bytes floor (bytes / copy bandwidth measured in the same run)
it reaches. Writes bench.json and bench.png (matplotlib) under --out and prints a table.

With --geometries it times dense and GSA instead over several head geometries (query / KV heads,
so GQA groups 1 to 16), at 128K keys and a 2048-token budget unless told, and with --docs writes
that table into a markdown file between the GEOMETRY_BEGIN and GEOMETRY_END marker lines."""

from __future__ import annotations

import logging
import os
import time

from ..tables import format_table, write_json

logger = logging.getLogger(__name__)

CHUNK = 128
MUST_SELECT = (0, -2, -1)
# Llama-3.1-8B (group 4), Qwen3-32B / Llama-3-70B (8), group 16, and MHA at batch 1.
DEFAULT_GEOMETRIES = "32/8,64/8,32/2,32/32@1"
GEOMETRY_BEGIN = "<!-- geometry table: written by benchmarks/gpu_bench.py, do not edit by hand -->"
GEOMETRY_END = "<!-- end of geometry table -->"


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="GPU decode-attention benchmark: GSA vs dense SDPA, FlexAttention, naive gather")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--keys", default=None,
                        help="comma-separated cache lengths (default 8192,32768,65536,131072; 131072 with --geometries)")
    parser.add_argument("--budgets", default=None, help="comma-separated budgets: an integer is a token budget, "
                        "a fraction a top-k ratio (default 2048,0.3; 2048 with --geometries)")
    parser.add_argument("--geometries", default="", help="time dense and GSA per head geometry instead: comma-separated "
                        f"Q/KV heads, each optionally @batches (e.g. {DEFAULT_GEOMETRIES}; 'default' means that)")
    parser.add_argument("--docs", default="", help="with --geometries: markdown file whose geometry table to rewrite")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.png")
    parser.add_argument("--skip", default="", help="comma-separated versions to leave out: flex, naive, compile, prefill, check")
    parser.add_argument("--sweep", default="", help="kernel variants to time at the largest batch and cache: "
                        "comma-separated parts among attend, select")
    parser.add_argument("--profile", action="store_true", help="also print per-kernel GPU times of the GSA step")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        from ..errors import GSABackendUnavailable

        raise GSABackendUnavailable("gsa-compile bench measures CUDA kernels and needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    if args.geometries:
        return run_geometries(args, skip)
    args.keys = args.keys or "8192,32768,65536,131072"
    args.budgets = args.budgets or "2048,0.3"
    bench = Bench(args.q_heads, args.kv_heads, args.head_dim)
    report = {"environment": bench.environment(), "copy_bandwidth_bytes_per_s": bench.bandwidth, "rows": []}
    print(f"device-to-device copy: {bench.bandwidth / 1e12:.2f} TB/s (bytes read + written)", flush=True)
    for batch in _ints(args.batches):
        for num_keys in _ints(args.keys):
            report["rows"] += bench.shape_rows(batch, num_keys, _budgets(args.budgets), skip)
            _write(args.out, report)
    if "prefill" not in skip:
        report["prefill_encode"] = bench.prefill_encode(32768)
        print(_prefill_line(report["prefill_encode"]), flush=True)
    if "compile" not in skip:
        report["compile"] = bench.compiled_decode(8, 32768)
        print(_compile_line(report["compile"]), flush=True)
    if args.sweep:
        report["sweep"] = bench.sweep(max(_ints(args.batches)), max(_ints(args.keys)), set(args.sweep.split(",")))
    if args.profile:
        report["profile"] = {f"batch {b} {budget}": bench.profile(b, max(_ints(args.keys)), budget)
                             for b in _ints(args.batches) for budget in _budgets(args.budgets)}
    _write(args.out, report)
    print(results_table(report["rows"]))
    plot(report["rows"], os.path.join(args.out, "bench.png"))
    return 0


def run_geometries(args, skip) -> int:
    """Dense and GSA (no Flex, naive or extras) for each geometry; one JSON, one table."""
    keys, budgets = _ints(args.keys or "131072"), _budgets(args.budgets or "2048")
    report = {"rows": [], "geometries": args.geometries}
    bandwidth = None
    for q_heads, kv_heads, batches in parse_geometries(args.geometries, _ints(args.batches)):
        bench = Bench(q_heads, kv_heads, args.head_dim, bandwidth)
        bandwidth = bench.bandwidth
        report.update(environment=bench.environment(), copy_bandwidth_bytes_per_s=bandwidth)
        for batch in batches:
            for num_keys in keys:
                for row in bench.shape_rows(batch, num_keys, budgets, skip | {"flex", "naive"}):
                    report["rows"].append({"q_heads": q_heads, "kv_heads": kv_heads, **row})
                _write(args.out, report)
    table = geometry_table(report["rows"])
    print(table)
    if args.docs:
        write_docs_table(args.docs, table)
        print(f"wrote the geometry table into {args.docs}", flush=True)
    return 0


def parse_geometries(text: str, default_batches) -> list:
    """'32/8,32/32@1' -> [(32, 8, default_batches), (32, 32, [1])]."""
    from ..errors import GSAInputError

    geometries = []
    for item in (DEFAULT_GEOMETRIES if text == "default" else text).split(","):
        heads, _, batches = item.partition("@")
        try:
            q_heads, kv_heads = (int(x) for x in heads.split("/"))
            chosen = [int(b) for b in batches.split("+")] if batches else list(default_batches)
        except ValueError:
            raise GSAInputError(f"--geometries item {item!r} is not Q/KV or Q/KV@B1+B2 (e.g. 32/8 or 32/32@1)") from None
        if q_heads % kv_heads:
            raise GSAInputError(f"--geometries item {item!r}: query heads must be a multiple of KV heads")
        geometries.append((q_heads, kv_heads, chosen))
    return geometries


def geometry_table(rows) -> str:
    """Markdown: one line per geometry, batch, cache length and budget (GSA against dense)."""
    dense = {(r["q_heads"], r["kv_heads"], r["batch"], r["keys"]): r for r in rows if r["version"] == "dense"}
    lines = ["| q / KV heads (group) | batch | keys | budget | dense us | GSA us | GSA x | % of bytes floor | "
             "select us | block scores us (TB/s of codes) | attend us | selection = reference |", "|" + " --- |" * 12]
    for r in rows:
        if r["version"] != "gsa":
            continue
        base = dense[(r["q_heads"], r["kv_heads"], r["batch"], r["keys"])]
        lines.append(
            f"| {r['q_heads']} / {r['kv_heads']} ({r['q_heads'] // r['kv_heads']}) | {r['batch']} | {r['keys'] // 1024}K "
            f"| {r['budget']} | {base['ms'] * 1e3:.1f} | {r['ms'] * 1e3:.1f} | {r['speedup']:.2f}x "
            f"| {r['floor_fraction'] * 100:.0f}% | {r['select_graph_ms'] * 1e3:.1f} "
            f"| {r['scores_graph_ms'] * 1e3:.1f} ({r['codes_bytes'] / r['scores_graph_ms'] / 1e9:.2f}) "
            f"| {r['attend_graph_ms'] * 1e3:.1f} "
            f"| {_yes_no(r.get('selection_equal'))} |")
    return "\n".join(lines)


def _yes_no(value) -> str:
    return "not checked" if value is None else ("yes" if value else "**no**")


def write_docs_table(path: str, table: str) -> None:
    """Replace what lies between the marker lines of `path` with `table`."""
    from ..errors import GSAInputError

    with open(path) as handle:
        text = handle.read()
    if GEOMETRY_BEGIN not in text or GEOMETRY_END not in text:
        raise GSAInputError(f"{path} has no geometry table markers; add the lines\n{GEOMETRY_BEGIN}\n{GEOMETRY_END}")
    head, rest = text.split(GEOMETRY_BEGIN, 1)
    tail = rest.split(GEOMETRY_END, 1)[1]
    with open(path, "w") as handle:
        handle.write(f"{head}{GEOMETRY_BEGIN}\n{table}\n{GEOMETRY_END}{tail}")


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _budgets(text):
    return [float(x) if "." in x else int(x) for x in text.split(",") if x]


def _write(folder, report):
    write_json(os.path.join(folder, "bench.json"), report)


class Bench:
    """Inputs, timers and byte counts for one device."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int, bandwidth=None):
        import torch

        self.torch = torch
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.dtype = torch.bfloat16
        self.device = torch.device("cuda")
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.bandwidth = bandwidth or self.copy_bandwidth()

    def environment(self) -> dict:
        import triton

        torch = self.torch
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "q_heads": self.q_heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "dtype": "bfloat16",
                "chunk": CHUNK, "must_select": list(MUST_SELECT)}

    # ---------------------------------------------------------------- timing
    def median_ms(self, fn) -> float:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def graph_ms(self, fn) -> tuple[float, object]:
        """Median of CUDA-graph replays of fn (captured after a warm-up), and fn's output."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return self.median_ms(graph.replay), out

    def copy_bandwidth(self) -> float:
        torch = self.torch
        source = torch.empty(1 << 30, dtype=torch.uint8, device=self.device).random_()
        target = torch.empty_like(source)
        ms = self.median_ms(lambda: target.copy_(source))
        del source, target
        return 2 * (1 << 30) / (ms * 1e-3)

    def randn(self, *shape):
        return torch_randn(self.torch, shape, self.generator, self.dtype, self.device)

    def decode_inputs(self, batch: int, num_keys: int):
        """Query, key, value of one decode step, the hash weight and the keys' cached codes."""
        from .. import functional as F

        d = self.head_dim
        query = self.randn(batch, self.q_heads, 1, d)
        key = self.randn(batch, self.kv_heads, num_keys, d)
        value = self.randn(batch, self.kv_heads, num_keys, d)
        weight = F.hash_weights(self.kv_heads, d, 128, seed=0).to(self.device)
        return query, key, value, weight, F.encode(key, weight)

    # ---------------------------------------------------------------- one shape
    def shape_rows(self, batch: int, num_keys: int, budgets, skip) -> list[dict]:
        torch = self.torch
        import torch.nn.functional as F_

        from .. import functional as F

        d, hq, hkv = self.head_dim, self.q_heads, self.kv_heads
        query, key, value, weight, codes = self.decode_inputs(batch, num_keys)
        item = key.element_size()
        kv_bytes = batch * hkv * num_keys * 2 * d * item
        io_bytes = 2 * batch * hq * d * item

        def dense():
            return F_.scaled_dot_product_attention(query, key, value, enable_gqa=True)

        dense_ms = self.median_ms(dense)
        dense_graph_ms, _ = self.graph_ms(dense)
        baseline = min(dense_ms, dense_graph_ms)
        rows = [self._row("dense", batch, num_keys, "all", baseline, kv_bytes + io_bytes, baseline,
                          eager_ms=dense_ms, graph_ms=dense_graph_ms)]
        naive_codes = None
        for budget in budgets:
            kwargs = {"budget_tokens": budget} if isinstance(budget, int) else {"top_k_ratio": budget}
            k = F.num_selected_blocks(num_keys, CHUNK, must_select=MUST_SELECT, **kwargs)
            label = f"{budget} tok" if isinstance(budget, int) else f"ratio {budget}"
            selected_tokens = min(k * CHUNK, num_keys)
            selected_bytes = batch * hkv * selected_tokens * 2 * d * item
            code_bytes = codes.numel() * codes.element_size()

            def select():
                return F.select_blocks(query, codes, weight, chunk_size=CHUNK, num_blocks=k, must_select=MUST_SELECT)

            def gsa():
                return F.sparse_attention(query, key, value, select(), chunk_size=CHUNK)

            blocks = select()
            gsa_ms = self.median_ms(gsa)
            gsa_graph_ms, _ = self.graph_ms(gsa)
            select_graph_ms, _ = self.graph_ms(select)
            scores_graph_ms = self.scores_graph_ms(query, codes, weight)
            attend_graph_ms, _ = self.graph_ms(
                lambda: F.sparse_attention(query, key, value, blocks, chunk_size=CHUNK))
            check = {} if "check" in skip else self.check(query, key, value, codes, weight, blocks, k)
            gsa_bytes = code_bytes + selected_bytes + io_bytes + batch * hkv * (-(-num_keys // CHUNK)) * 8
            rows.append(self._row("gsa", batch, num_keys, label, min(gsa_ms, gsa_graph_ms), gsa_bytes, baseline,
                                  eager_ms=gsa_ms, graph_ms=gsa_graph_ms, select_graph_ms=select_graph_ms,
                                  scores_graph_ms=scores_graph_ms, codes_bytes=code_bytes,
                                  attend_graph_ms=attend_graph_ms, blocks=k, **check))
            if "flex" not in skip:
                rows.append(self._flex_row(query, key, value, blocks, batch, num_keys, label, selected_bytes + io_bytes,
                                           baseline))
            if "naive" not in skip:
                if naive_codes is None:
                    naive_codes = (_unpack_signs(torch, codes)).to(self.dtype)
                rows.append(self._naive_row(query, key, value, weight, naive_codes, k, batch, num_keys, label,
                                            naive_codes.numel() * item + 3 * selected_bytes + io_bytes, baseline))
            for row in rows[-3:]:
                if row["budget"] == label:
                    print(_row_line(row), flush=True)
        print(_row_line(rows[0]), flush=True)
        del naive_codes
        torch.cuda.empty_cache()
        return rows

    def scores_graph_ms(self, query, codes, weight) -> float:
        """The block-score kernel alone (max over tokens, no mask), from the query's planes."""
        from ..kernels.triton import block_scores, hash_encode

        planes = hash_encode.query_planes(query, weight)
        groups = self.q_heads // self.kv_heads
        ms, _ = self.graph_ms(lambda: block_scores.block_scores(planes, codes, None, None, CHUNK, "max", groups))
        return ms

    def _row(self, version, batch, num_keys, budget, ms, bytes_moved, baseline, **extra) -> dict:
        floor_ms = bytes_moved / self.bandwidth * 1e3
        return {"version": version, "batch": batch, "keys": num_keys, "budget": budget, "ms": ms,
                "speedup": baseline / ms, "bytes": bytes_moved, "floor_ms": floor_ms,
                "floor_fraction": floor_ms / ms, **extra}

    def check(self, query, key, value, codes, weight, blocks, k) -> dict:
        """Selection equal to the reference's, attention error against float64 on that selection."""
        from ..kernels import reference as ref

        torch = self.torch
        rows = min(query.shape[0], 2)  # the reference unpacks every bit: keep its memory bounded
        expected = ref.select_blocks(query[:rows], codes[:rows], weight, None, None, CHUNK, k, list(MUST_SELECT),
                                     "max", "per_head")
        from .. import functional as F

        out = F.sparse_attention(query[:rows], key[:rows], value[:rows], blocks[:rows], chunk_size=CHUNK)
        exact = ref.sparse_attention(query[:rows].double(), key[:rows].double(), value[:rows].double(), blocks[:rows],
                                     None, None, CHUNK, None, None)
        error = ((out.double() - exact).norm() / exact.norm()).item()
        return {"selection_equal": bool(torch.equal(blocks[:rows], expected)), "attention_rel_error": error}

    def _flex_row(self, query, key, value, blocks, batch, num_keys, label, bytes_moved, baseline) -> dict:
        torch = self.torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        if not hasattr(self, "_flex"):
            self._flex = torch.compile(flex_attention, dynamic=False)
        groups = self.q_heads // self.kv_heads
        n_blocks = -(-num_keys // CHUNK)
        chosen = blocks.repeat_interleave(groups, dim=1)
        indices = torch.zeros(batch, self.q_heads, 1, n_blocks, dtype=torch.int32, device=self.device)
        indices[..., : chosen.shape[-1]] = chosen.clamp(min=0).unsqueeze(2)
        counts = (chosen >= 0).sum(-1, dtype=torch.int32).unsqueeze(-1)
        mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=CHUNK, seq_lengths=(1, num_keys))
        fn = lambda: self._flex(query, key, value, block_mask=mask, enable_gqa=True)  # noqa: E731
        started = time.time()
        out = fn()
        compile_s = time.time() - started
        # Same selection, so the same attention: a wrong BlockMask would show here.
        from .. import functional as F

        gsa_out = F.sparse_attention(query, key, value, blocks, chunk_size=CHUNK).float()
        error = ((out.float() - gsa_out).norm() / gsa_out.norm()).item()
        return self._row("flex", batch, num_keys, label, self.median_ms(fn), bytes_moved, baseline,
                         compile_s=compile_s, rel_error_vs_gsa=error)

    def _naive_row(self, query, key, value, weight, signs, k, batch, num_keys, label, bytes_moved, baseline) -> dict:
        torch = self.torch
        import torch.nn.functional as F_

        from .. import functional as F

        groups = self.q_heads // self.kv_heads
        n_blocks = -(-num_keys // CHUNK)
        must = torch.tensor([m % n_blocks for m in MUST_SELECT], device=self.device)
        offsets = torch.arange(CHUNK, device=self.device)

        def naive():
            q_signs = _unpack_signs(torch, F.encode(query, weight)).to(self.dtype)[:, :, 0]
            q_group = q_signs.view(batch, self.kv_heads, groups, -1).sum(2)
            scores = torch.einsum("bhr,bhlr->bhl", q_group, signs).float()
            scores = F_.pad(scores, (0, n_blocks * CHUNK - num_keys), value=float("-inf"))
            block = scores.view(batch, self.kv_heads, n_blocks, CHUNK).amax(-1).index_fill(-1, must, float("inf"))
            chosen = block.topk(k, dim=-1).indices.sort(-1).values
            tokens = (chosen.unsqueeze(-1) * CHUNK + offsets).flatten(-2).clamp(max=num_keys - 1)
            index = tokens.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
            return F_.scaled_dot_product_attention(query, key.gather(2, index), value.gather(2, index), enable_gqa=True)

        return self._row("naive", batch, num_keys, label, self.median_ms(naive), bytes_moved, baseline)

    # ---------------------------------------------------------------- prefill and compile
    def prefill_encode(self, num_keys: int) -> dict:
        torch = self.torch
        import torch.nn.functional as F_

        from .. import functional as F

        query = self.randn(1, self.q_heads, num_keys, self.head_dim)
        key = self.randn(1, self.kv_heads, num_keys, self.head_dim)
        value = self.randn(1, self.kv_heads, num_keys, self.head_dim)
        weight = F.hash_weights(self.kv_heads, self.head_dim, 128, seed=0).to(self.device)
        encode_ms = self.median_ms(lambda: F.encode(key, weight))
        dense_ms = self.median_ms(lambda: F_.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True))
        del query, key, value
        torch.cuda.empty_cache()
        return {"keys": num_keys, "encode_ms": encode_ms, "dense_prefill_attention_ms": dense_ms,
                "fraction": encode_ms / dense_ms}

    def compiled_decode(self, batch: int, num_keys: int) -> dict:
        """torch.compile(mode="reduce-overhead", fullgraph=True) of a masked decode step: graphs,
        graph breaks and recompilations over several steps, and the step time against dense."""
        torch = self.torch
        import torch._dynamo
        import torch.nn.functional as F_
        from torch._dynamo.utils import counters

        from .. import functional as F

        d = self.head_dim
        _, key, value, weight, codes = self.decode_inputs(batch, num_keys)
        mask = torch.ones(batch, 1, 1, num_keys, dtype=torch.bool, device=self.device)
        mask[0, ..., : num_keys // 4] = False

        def step(query):
            return F.gsa_attention(query, key, value, weight, key_codes=codes, budget_tokens=2048, attn_mask=mask,
                                   seq_len_threshold=2048, concurrency_threshold=1)

        def dense_step(query):
            return F_.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)

        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        query = self.randn(batch, self.q_heads, 1, d)
        errors = []
        for _ in range(6):  # new query values each step, as in decoding
            query.copy_(self.randn(batch, self.q_heads, 1, d))
            out = compiled(query).clone()
            expected = step(query)
            errors.append(((out.float() - expected.float()).norm() / expected.float().norm()).item())
        graphs, breaks = int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))
        # Inductor counts (and logs, under TORCH_LOGS=perf_hints) each graph it could not capture.
        cudagraph_skips = int(counters["inductor"]["cudagraph_skips"])
        compiled_dense = torch.compile(dense_step, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            compiled_dense(query)
        result = {"batch": batch, "keys": num_keys, "unique_graphs": graphs, "graph_breaks": breaks,
                  "cudagraph_skips": cudagraph_skips,
                  "max_rel_error_vs_eager": max(errors),
                  "gsa_step_ms": self.median_ms(lambda: compiled(query)),
                  "dense_step_ms": self.median_ms(lambda: compiled_dense(query))}
        result["speedup"] = result["dense_step_ms"] / result["gsa_step_ms"]
        return result

    # ---------------------------------------------------------------- profile
    def profile(self, batch: int, num_keys: int, budget) -> dict:
        """Average GPU time of each kernel of one GSA step (eager launches, same kernels)."""
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile

        from .. import functional as F

        query, key, value, weight, codes = self.decode_inputs(batch, num_keys)
        kwargs = {"budget_tokens": budget} if isinstance(budget, int) else {"top_k_ratio": budget}
        k = F.num_selected_blocks(num_keys, CHUNK, must_select=MUST_SELECT, **kwargs)

        def step():
            blocks = F.select_blocks(query, codes, weight, chunk_size=CHUNK, num_blocks=k)
            return F.sparse_attention(query, key, value, blocks, chunk_size=CHUNK)

        step()
        torch.cuda.synchronize()
        runs = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                step()
            torch.cuda.synchronize()
        kernels = {}
        for event in prof.key_averages():
            total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total_us:
                kernels[event.key[:60]] = total_us / runs
        print(f"profile batch {batch} keys {num_keys} budget {budget}:", flush=True)
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
            print(f"  {us:9.1f} us  {name}", flush=True)
        return kernels

    # ---------------------------------------------------------------- tile sweep
    def sweep(self, batch: int, num_keys: int, parts: set) -> list[dict]:
        """Times the kernels' tunables one at a time (everything else at its default)."""
        from .. import functional as F
        from ..kernels.triton import block_scores, decode_attention, selection

        query, key, value, weight, codes = self.decode_inputs(batch, num_keys)
        results = []

        def record(part, setting, fn):
            ms, _ = self.graph_ms(fn)
            results.append({"part": part, "setting": setting, "ms": ms})
            print(f"sweep {part:10s} {setting:28s} {ms * 1e3:8.1f} us", flush=True)

        for budget in (2048, 0.3) if "attend" in parts else ():
            kwargs = {"budget_tokens": budget} if isinstance(budget, int) else {"top_k_ratio": budget}
            k = F.num_selected_blocks(num_keys, CHUNK, must_select=MUST_SELECT, **kwargs)
            blocks = F.select_blocks(query, codes, weight, chunk_size=CHUNK, num_blocks=k)
            default_tiles = decode_attention.tile_config
            for tiles in ((32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3)):
                for per_sm in (2, 4, 8):
                    decode_attention.tile_config = lambda *_, t=tiles: t
                    decode_attention.PROGRAMS_PER_SM = per_sm
                    record(f"attend {budget}", f"tile {tiles} programs/SM {per_sm}",
                           lambda: F.sparse_attention(query, key, value, blocks, chunk_size=CHUNK))
            decode_attention.tile_config, decode_attention.PROGRAMS_PER_SM = default_tiles, 4
        if "select" not in parts:
            return results
        defaults = block_scores.TOKENS_PER_PROGRAM, block_scores.NUM_WARPS, selection.topk_num_warps
        for tokens in (256, 512, 1024, 2048):
            for warps in (2, 4, 8):
                block_scores.TOKENS_PER_PROGRAM, block_scores.NUM_WARPS = tokens, warps
                record("select", f"scores: tokens {tokens} warps {warps}",
                       lambda: F.select_blocks(query, codes, weight, chunk_size=CHUNK, num_blocks=16))
        block_scores.TOKENS_PER_PROGRAM, block_scores.NUM_WARPS = defaults[:2]
        for warps in (1, 2, 4, 8):
            selection.topk_num_warps = lambda _, w=warps: w
            record("select", f"top-k warps {warps}",
                   lambda: F.select_blocks(query, codes, weight, chunk_size=CHUNK, num_blocks=16))
        selection.topk_num_warps = defaults[2]
        return results


def torch_randn(torch, shape, generator, dtype, device):
    return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def _unpack_signs(torch, codes):
    from ..kernels.common import unpack_codes

    return unpack_codes(codes).to(torch.int8) * 2 - 1


# -------------------------------------------------------------------- output
def _row_line(row) -> str:
    return (f"{row['version']:6s} batch {row['batch']:2d} keys {row['keys']:7d} {row['budget']:>10s}  "
            f"{row['ms'] * 1e3:9.1f} us  x{row['speedup']:6.2f}  {row['bytes'] / 1e6:9.1f} MB  "
            f"floor {row['floor_fraction'] * 100:5.1f}%")


def results_table(rows) -> str:
    header = ("version", "batch", "keys", "budget", "median us", "vs dense", "MB moved", "floor us", "% of floor")
    lines = [header]
    for r in rows:
        lines.append((r["version"], r["batch"], r["keys"], r["budget"], f"{r['ms'] * 1e3:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['bytes'] / 1e6:.1f}", f"{r['floor_ms'] * 1e3:.1f}",
                      f"{r['floor_fraction'] * 100:.0f}%"))
    return format_table(lines)


def _prefill_line(p) -> str:
    return (f"prefill encode of {p['keys']} keys: {p['encode_ms'] * 1e3:.1f} us = "
            f"{p['fraction'] * 100:.2f}% of dense causal prefill attention ({p['dense_prefill_attention_ms']:.2f} ms)")


def _compile_line(c) -> str:
    return (f"torch.compile reduce-overhead, batch {c['batch']} keys {c['keys']}: graphs {c['unique_graphs']}, "
            f"graph breaks {c['graph_breaks']}, CUDA-graph skips {c['cudagraph_skips']}, "
            f"step {c['gsa_step_ms'] * 1e3:.1f} us vs dense "
            f"{c['dense_step_ms'] * 1e3:.1f} us (x{c['speedup']:.2f}), error vs eager {c['max_rel_error_vs_eager']:.1e}")


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no plot written")
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == batch and r["version"] != "dense"]
        for version, budget in sorted({(r["version"], r["budget"]) for r in mine}):
            series = sorted((r["keys"], r["speedup"]) for r in mine if r["version"] == version and r["budget"] == budget)
            ax.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=f"{version} {budget}")
            if version == "gsa":
                dense = {r["keys"]: r for r in rows if r["batch"] == batch and r["version"] == "dense"}
                floors = sorted((r["keys"], dense[r["keys"]]["floor_ms"] / r["floor_ms"])
                                for r in mine if r["version"] == "gsa" and r["budget"] == budget)
                ax.plot([f[0] for f in floors], [f[1] for f in floors], linestyle="--", color="gray", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("keys in cache")
        ax.set_ylabel("speedup over dense SDPA (enable_gqa)")
        ax.set_title(f"decode attention, batch {batch} (dashed: GSA bytes floor)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
