"""GSA in onnxruntime (CPU): one gsa.Attention call and one decode step of a model.

    python benchmarks/onnx_bench.py                          # 8K and 32K keys, 1 thread
    python benchmarks/onnx_bench.py --keys 8192 --repeats 5 --out out/onnx_bench
    python benchmarks/onnx_bench.py --coverage               # export + 16-step greedy check per architecture

Variants, side by side in one process, each on one thread:
- dense ORT: the same file with the dense fallback forced (seq_len_threshold above the cache),
  i.e. exact attention over the whole cache in onnxruntime's standard kernels;
- function body: stock onnxruntime running the gsa ops' model-local functions;
- custom kernel: gsa_compile.onnx.session (this project's CPU kernels for gsa.SelectTopBlocks and
  gsa.SparseAttention, registered through onnxruntime's C API);
- PyTorch GSA: the gsa ops eagerly on this project's CPU kernels.
Each repetition runs the variants back to back (so machine noise hits all alike); medians of wall
time and of process CPU time are reported (CPU time is what to compare on a shared machine).
Agreement: the custom kernel's selection equals the function body's index for index, and the
largest output difference. Prints a table, writes JSON and a PNG plot.

--coverage builds every causal LM of the installed transformers that the Hugging Face sweep
(benchmarks/coverage.py, its results JSON) optimizes, from that sweep's tiny random config, with
the GSA config of tests/onnx/onnx_architectures.py (4-token blocks, layer 1 on reusing layer 0's
selection), exports its decode step and checks that a 16-step greedy loop in onnxruntime gives
the PyTorch GSA model's tokens; one architecture at a time in a forked process; writes
benchmarks/results/onnx_coverage.json after each."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from gsa_compile import functional as F
from gsa_compile.tables import format_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
VARIANTS = ("dense ORT", "function body", "custom kernel", "PyTorch GSA")


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def _sessions(model_bytes: bytes, dense_bytes: bytes):
    import onnxruntime as ort

    import gsa_compile.onnx

    def options():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: the inliner warns about subgraph renames
        return opts

    return {
        "dense ORT": ort.InferenceSession(dense_bytes, options(), providers=["CPUExecutionProvider"]),
        "function body": ort.InferenceSession(model_bytes, options(), providers=["CPUExecutionProvider"]),
        "custom kernel": gsa_compile.onnx.session(model_bytes, options()),
    }


def forced_dense(proto):
    """A copy of `proto` whose gsa sites all take their dense branch (seq_len_threshold = 2**62)."""
    import onnx

    dense = onnx.ModelProto()
    dense.CopyFrom(proto)
    for node in dense.graph.node:
        for attribute in node.attribute:
            if attribute.name == "seq_len_threshold":
                attribute.i = 1 << 62
    return dense


def _warm(runs: dict, warmup: int) -> None:
    for _ in range(warmup):
        for run in runs.values():
            run()


def _run_variants(runs: dict, repeats: int, warmup: int) -> dict:
    _warm(runs, warmup)
    times = {name: {"wall": [], "cpu": []} for name in runs}
    outputs = {}
    for _ in range(repeats):
        for name, run in runs.items():
            outputs[name], wall, cpu = _timed(run)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    medians = {name: {kind: statistics.median(values) for kind, values in entry.items()} for name, entry in times.items()}
    return {"medians_ms": medians, "outputs": outputs}


def _kernel_seconds() -> dict:
    """Process seconds spent so far inside each custom kernel (runtime's library)."""
    from gsa_compile.onnx import runtime

    return dict(runtime._library().seconds)


def _kernel_ms(before: dict, repeats: int) -> dict:
    """CPU ms per run inside each kernel since `before`, and their total."""
    after = _kernel_seconds()
    per_op = {op: (after[op] - before.get(op, 0.0)) / repeats * 1e3 for op in after}
    return {**per_op, "total": sum(per_op.values())}


# ---------------------------------------------------------------------- one gsa.Attention call
def bench_attention(args, keys: int) -> dict:
    from gsa_compile.onnx import runtime
    from gsa_compile.onnx.export import node_model
    from onnx import helper, numpy_helper

    gen = torch.Generator().manual_seed(keys)
    kv_heads = args.q_heads // args.groups
    query = torch.randn(1, args.q_heads, 1, args.dim, generator=gen)
    key = torch.randn(1, kv_heads, keys, args.dim, generator=gen)
    value = torch.randn(1, kv_heads, keys, args.dim, generator=gen)
    weight = F.hash_weights(kv_heads, args.dim, args.bits, seed=0)
    codes = F.encode(key, weight)
    feeds = dict(query=query, key=key, value=value, key_codes=codes, weight=weight,
                 attn_mask=torch.zeros(1, 1, 1, keys), key_norms=torch.ones(1, 1, 1))
    feeds = {name: tensor.numpy() for name, tensor in feeds.items()}
    attrs = dict(
        chunk_size=args.chunk, budget_tokens=args.budget_tokens, scale=args.dim ** -0.5, softcap=0.0, is_causal=0,
        seq_len_threshold=0, concurrency_threshold=0, repre="max", scope="per_head",
        top_k_ratio=numpy_helper.from_array(np.array(0.0), "top_k_ratio"),
        must_select=helper.make_attribute("must_select", [0, -2, -1]),
    )
    proto = node_model("Attention", feeds, **attrs)
    sessions = _sessions(proto.SerializeToString(), forced_dense(proto).SerializeToString())
    runs = {name: (lambda s=session: s.run(None, feeds)) for name, session in sessions.items()}
    runs["PyTorch GSA"] = lambda: F.gsa_attention(
        query, key, value, weight, key_codes=codes, chunk_size=args.chunk, budget_tokens=args.budget_tokens,
        return_blocks=True,
    )
    _warm(runs, args.warmup)
    before, seconds = runtime.calls["SelectTopBlocks"], _kernel_seconds()
    result = _run_variants(runs, args.repeats, 0)
    result["kernels_cpu_ms"] = _kernel_ms(seconds, args.repeats)
    outputs = result.pop("outputs")
    body, fast = outputs["function body"], outputs["custom kernel"]
    torch_out, torch_blocks = outputs["PyTorch GSA"]
    result.update(
        what="gsa.Attention", keys=keys,
        kernel_calls=runtime.calls["SelectTopBlocks"] - before,
        blocks_equal_body=bool((fast[1] == body[1]).all()),
        blocks_equal_pytorch=bool((fast[1] == torch_blocks.numpy()).all()),
        max_abs_diff_body=float(np.abs(fast[0] - body[0]).max()),
        max_abs_diff_pytorch=float(np.abs(fast[0] - torch_out.numpy()).max()),
        max_abs_diff_dense=float(np.abs(fast[0] - outputs["dense ORT"][0]).max()),
    )
    return result


# ---------------------------------------------------------------------- the kernel bridge itself
BRIDGE_SIZES_MB = (0.001, 4, 16, 64)


def _probe_model(domain: str) -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Probe", ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(domain, 1)],
                             ir_version=10).SerializeToString()


def bench_bridge(args) -> dict:
    """CPU ms per call of a custom op that reads nothing and returns one float, fed an input of
    each size: what handing a kernel its inputs costs, through onnxruntime-extensions' Python
    custom ops (PyOp: a copy of every input) and through the C API bridge of
    gsa_compile.onnx.session (views of onnxruntime's buffers)."""
    import onnxruntime as ort

    from gsa_compile.onnx.native import ELEMENT_TYPES, CustomOpLibrary, KernelSpec

    def options():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        return opts

    def probe(inputs, attributes):
        return [np.zeros(1, np.float32)]

    float_type = ELEMENT_TYPES["tensor(float)"]
    library = CustomOpLibrary("gsa_bench", [KernelSpec("Probe", [float_type], [float_type], {}, probe)])
    bridge_options = options()
    library.add_to(bridge_options)
    sessions = {"C API bridge": ort.InferenceSession(_probe_model("gsa_bench"), bridge_options)}
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

        onnx_op(op_type="gsa_pyop::Probe", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float])(
            lambda x: np.zeros(1, np.float32))
        pyop_options = options()
        pyop_options.register_custom_ops_library(get_library_path())
        sessions["onnxruntime-extensions PyOp"] = ort.InferenceSession(_probe_model("gsa_pyop"), pyop_options)
    except ImportError:
        pass
    rows = []
    for megabytes in BRIDGE_SIZES_MB:
        x = np.random.default_rng(0).standard_normal(max(int(megabytes * (1 << 20)) // 4, 1), dtype=np.float32)
        runs = {name: (lambda s=session: s.run(None, {"x": x})) for name, session in sessions.items()}
        medians = _run_variants(runs, args.repeats * 3, args.warmup)["medians_ms"]
        rows.append(dict(input_mb=megabytes, **{name: medians[name]["cpu"] for name in sessions}))
    return dict(what="bridge", variants=list(sessions), rows=rows)


def bridge_table(bridge: dict) -> str:
    header = ["input", *[f"{name} ms (cpu)" for name in bridge["variants"]]]
    rows = [[f"{row['input_mb']:g} MB", *[f"{row[name]:.3f}" for name in bridge["variants"]]] for row in bridge["rows"]]
    return format_table([header, *rows])


# ---------------------------------------------------------------------- one decode step
def build_decode_step(args, directory: str):
    import transformers

    import gsa_compile
    from gsa_compile.onnx import DecodeStep, export_decode_step

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.q_heads, num_key_value_heads=args.q_heads // args.groups, head_dim=args.dim,
        max_position_embeddings=1 << 17,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    gsa_config = gsa_compile.GSAConfig.for_model(
        model, chunk_size=args.chunk, budget_tokens=args.budget_tokens, top_k_ratio_per_layer=[0.5] * args.layers,
        top_k_index_reuse=[-1] * args.layers, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0,
    )
    step = DecodeStep(model, gsa_config)
    path = os.path.join(directory, "step.onnx")
    proto = export_decode_step(step, path)
    return step, proto


def bench_decode_step(args, step, proto, keys: int) -> dict:
    from gsa_compile.onnx import runtime, torch_runner

    gen = torch.Generator().manual_seed(keys)
    feeds = {"input_ids": np.array([[5]], dtype=np.int64), "attention_mask": np.ones((1, keys + 1), dtype=np.int64),
             "position_ids": np.array([[keys]], dtype=np.int64)}
    past = []
    for layer, layout in enumerate(step.layouts):
        key = torch.randn(1, layout.key_heads, keys, layout.key_dim, generator=gen)
        past += [key, torch.randn(1, layout.value_heads, keys, layout.value_dim, generator=gen)]
        if layer in step.code_layers:
            past.append(F.encode(key, step.sites[layer].hash_weight))
    feeds.update({name: tensor.numpy() for name, tensor in zip(step.past_names(), past)})
    sessions = _sessions(proto.SerializeToString(), forced_dense(proto).SerializeToString())
    names = step.output_names()[:1]  # the logits: presents are copies of the inputs plus one position
    runs = {name: (lambda s=session: s.run(names, feeds)) for name, session in sessions.items()}
    pytorch = torch_runner(step)
    runs["PyTorch GSA"] = lambda: pytorch(feeds)
    _warm(runs, args.warmup)
    before, seconds = runtime.calls["SelectTopBlocks"], _kernel_seconds()
    result = _run_variants(runs, args.repeats, 0)
    result["kernels_cpu_ms"] = _kernel_ms(seconds, args.repeats)
    outputs = result.pop("outputs")
    body, fast = outputs["function body"][0], outputs["custom kernel"][0]
    result.update(
        what=f"decode step ({args.layers} layers)", keys=keys,
        kernel_calls=runtime.calls["SelectTopBlocks"] - before,
        same_token_body=bool((fast[:, -1].argmax(-1) == body[:, -1].argmax(-1)).all()),
        max_abs_diff_body=float(np.abs(fast - body).max()),
        max_abs_diff_pytorch=float(np.abs(fast - outputs["PyTorch GSA"][0]).max()),
    )
    return result


def table(results: list) -> str:
    rows = [["what", "keys", *[f"{name} ms (cpu)" for name in VARIANTS], "in the kernels (cpu)", "body / kernel (cpu)",
             "agreement"]]
    for result in results:
        medians = result["medians_ms"]
        cells = [f"{medians[name]['wall']:.1f} ({medians[name]['cpu']:.1f})" for name in VARIANTS]
        ratio = medians["function body"]["cpu"] / medians["custom kernel"]["cpu"]
        if "blocks_equal_body" in result:
            agreement = (f"blocks {'equal' if result['blocks_equal_body'] else 'DIFFER'}, "
                         f"max diff {result['max_abs_diff_body']:.1e}")
        else:
            agreement = (f"token {'equal' if result['same_token_body'] else 'DIFFERS'}, "
                         f"max diff {result['max_abs_diff_body']:.1e}")
        rows.append([result["what"], result["keys"], *cells, f"{result['kernels_cpu_ms']['total']:.1f}", f"{ratio:.2f}x",
                     agreement])
    return format_table(rows)


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["what"] for r in results}, key=lambda w: (not w.startswith("gsa"), w))
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for axis, group in zip(axes[0], groups):
        entries = [r for r in results if r["what"] == group]
        width = 0.8 / len(VARIANTS)
        for index, name in enumerate(VARIANTS):
            xs = [i + index * width for i in range(len(entries))]
            axis.bar(xs, [r["medians_ms"][name]["cpu"] for r in entries], width, label=name)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(entries))])
        axis.set_xticklabels([f"{r['keys'] // 1024}K keys" for r in entries])
        axis.set_ylabel("CPU ms per call (1 thread, median)")
        axis.set_title(group)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_bench(args) -> int:
    torch.set_num_threads(1)
    results = [bench_attention(args, keys) for keys in args.keys]
    if args.layers > 0:
        with tempfile.TemporaryDirectory() as directory:
            step, proto = build_decode_step(args, directory)
            results += [bench_decode_step(args, step, proto, keys) for keys in args.keys]
    print(table(results))
    bridge = bench_bridge(args)
    print(bridge_table(bridge))
    shape = dict(q_heads=args.q_heads, kv_heads=args.q_heads // args.groups, dim=args.dim, bits=args.bits,
                 chunk=args.chunk, budget_tokens=args.budget_tokens, batch=1, dtype="float32", threads=1,
                 hidden=args.hidden, layers=args.layers)
    import onnxruntime

    payload = dict(shape=shape, load_average=os.getloadavg(), onnxruntime=onnxruntime.__version__,
                   torch=torch.__version__, results=results, bridge=bridge)
    write_json(args.out + ".json", payload)
    plot(results, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


# ---------------------------------------------------------------------- coverage sweep
def _check_architecture(model_type: str, class_name: str, queue) -> None:
    sys.path[:0] = [HERE, os.path.join(ROOT, "tests", "onnx")]
    import coverage as hf_coverage
    import onnx_architectures as arch

    torch.set_num_threads(1)
    started = time.time()
    try:
        model = hf_coverage.build(model_type, class_name)
        _randomize_zero_matrices(model)
        config = arch.gsa_config(model)
    except Exception as exc:  # the tiny config or model cannot be built here
        queue.put(dict(outcome="unbuildable", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        return
    ids, mask = arch.prompt()
    try:
        expected, sparse_calls = arch.generated_by_pytorch(model, config, ids, mask)
    except Exception as exc:
        queue.put(dict(outcome="not optimized by the HF route",
                       reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        return
    try:
        with tempfile.TemporaryDirectory() as directory:
            tokens, _ = arch.generated_by_onnxruntime(model, config, os.path.join(directory, "m.onnx"), ids, mask)
    except Exception as exc:
        from gsa_compile.errors import GSAError

        queue.put(dict(outcome="refused" if isinstance(exc, GSAError) else "fail",
                       reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", sparse_calls=sparse_calls))
        return
    equal = bool((tokens == expected).all())
    outcome, reason = ("pass", "") if equal else ("fail", f"tokens equal at {(tokens == expected).mean():.2f} of positions")
    if sparse_calls == 0:
        # The reference decoded dense (the HF route's own fallback): the comparison checks less.
        outcome, reason = f"{outcome}, PyTorch GSA made no sparse call", reason or "the HF route ran every call dense"
    queue.put(dict(outcome=outcome, sparse_calls=int(sparse_calls), reason=reason,
                   seconds=round(time.time() - started, 1)))


def _randomize_zero_matrices(model) -> None:
    """Give weight matrices that the family initializes to zeros (router gates) seeded random
    values: a zero gate ties every expert's score, and torch.topk and ONNX TopK break exact
    ties differently (torch picked experts 2, 3 of 4 where onnxruntime picked 0, 1), which
    would compare tie-breaking instead of the export. Both runs then use the same weights."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and parameter.is_floating_point() and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def _hf_statuses() -> dict:
    """model type -> the Hugging Face sweep's status (benchmarks/results/coverage_hf.json)."""
    path = os.path.join(RESULTS, "coverage_hf.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return {name: entry["status"] for name, entry in json.load(handle)["results"].items()}


# HF sweep statuses whose architectures the ONNX sweep checks: the route optimizes them (or runs
# them dense for a stated reason, which the export must refuse with that reason).
CHECKED_HF_STATUSES = ("pass", "dense", "fail")


def run_coverage(args) -> int:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = os.path.join(RESULTS, "onnx_coverage.json")
    results = {}
    if os.path.exists(path) and not args.fresh:
        with open(path) as handle:
            results = json.load(handle)["architectures"]
    hf = _hf_statuses()
    names = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    wanted = args.only.split(",") if args.only else sorted(names)
    context = multiprocessing.get_context("fork")
    for model_type in wanted:
        if model_type in results and not args.only:
            continue
        if not args.only and hf and hf.get(model_type) not in CHECKED_HF_STATUSES:
            results[model_type] = dict(outcome="not run", reason=f"Hugging Face sweep: {hf.get(model_type, 'absent')}")
            continue
        queue = context.Queue()
        process = context.Process(target=_check_architecture, args=(model_type, names[model_type], queue))
        process.start()
        process.join(args.timeout)
        if process.is_alive():
            process.kill()
            process.join()
            results[model_type] = dict(outcome="timeout", reason=f"over {args.timeout} s")
        else:
            results[model_type] = queue.get() if not queue.empty() else dict(outcome="fail", reason="crashed")
        results[model_type]["hf_sweep"] = hf.get(model_type, "absent")
        print(f"{model_type:28s} {results[model_type]['outcome']:30s} {results[model_type].get('reason', '')}",
              flush=True)
        write_json(path, dict(transformers=__import__("transformers").__version__, architectures=results,
                              totals=coverage_totals(results)))
    print(format_table([["outcome", "architectures"], *sorted(coverage_totals(results).items())]))
    return 0


def coverage_totals(results: dict) -> dict:
    counts: dict = {}
    for entry in results.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4, help="query heads per KV head (default 4: 8 KV heads)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--budget-tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the decode-step model")
    parser.add_argument("--layers", type=int, default=2, help="layers of the decode-step model (0: skip it)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(RESULTS, "onnx_bench"))
    parser.add_argument("--coverage", action="store_true", help="run the architecture sweep instead")
    parser.add_argument("--only", help="comma-separated model types for --coverage")
    parser.add_argument("--fresh", action="store_true", help="--coverage: ignore earlier results")
    parser.add_argument("--timeout", type=int, default=300, help="--coverage: seconds per architecture")
    args = parser.parse_args(argv)
    return run_coverage(args) if args.coverage else run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
