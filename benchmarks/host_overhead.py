"""Host time of one GSA decode layer, without the GPU: the Python work of the Hugging Face route's
attention call and key encode with every Triton launch stubbed out (the Triton interpreter's
launcher replaced by a no-op), against transformers' sdpa call on the same tensors. What it
measures is what eager `generate()` pays per sparse layer on the host before the kernels, on
any machine; Triton's own launcher (6 launches per sparse layer) comes on top on a GPU.

    python benchmarks/host_overhead.py --out host_out

Rows: `direct` (plain eager calls run the ops' implementations, the default) and `dispatcher`
(every call forced through torch's custom-op dispatcher, as traced code runs them). CPU time
of this process (time.process_time), so other processes on the machine count less. Prints a
table and writes host_overhead.json and host_overhead.png.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the launcher is the interpreter's

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import gsa_compile  # noqa: E402
from gsa_compile import kernels, ops  # noqa: E402
from gsa_compile.capture import hf_attention  # noqa: E402
from gsa_compile.kernels import validation  # noqa: E402
from gsa_compile.tables import format_table, write_json  # noqa: E402

OPS = ("encode", "select_blocks", "sparse_attention", "attention")


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel launch does nothing (outputs stay uninitialised), and the block-id
    check that would read those outputs is off."""
    from triton.runtime.interpreter import InterpretedFunction

    launcher, check = InterpretedFunction.__getitem__, validation.check_block_values
    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    validation.check_block_values = lambda *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.__getitem__, validation.check_block_values = launcher, check


@contextlib.contextmanager
def through_dispatcher(on: bool):
    saved = {name: getattr(ops, name) for name in OPS}
    if on:
        for name in OPS:
            setattr(ops, name, getattr(ops, f"{name}_op"))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def host_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    started = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - started) / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--out", default="host_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, vocab_size=1000, num_hidden_layers=8, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    gsa_config = gsa_compile.GSAConfig.for_model(model, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0,
                                                 budget_tokens=256, chunk_size=32)
    model = gsa_compile.optimize(model, gsa_config)
    runtime = model.gsa_runtime
    layer = next(index for index, site in runtime.sites.items() if site.policy == "sparse")
    site, module = runtime.sites[layer], model.model.layers[layer].self_attn
    cache = DynamicCache(config=model.config)
    rows = []
    with torch.no_grad(), kernels.use_backend("triton"):
        model(torch.randint(3, 1000, (2, args.keys)), past_key_values=cache, use_cache=True)
        query = torch.randn(2, 8, 1, 16)
        key, value = cache.layers[layer].keys, cache.layers[layer].values

        def attention_call():
            return hf_attention.gsa_attention_forward(module, query, key, value, None, scaling=0.25,
                                                      gsa_step=hf_attention.DecodeStep(runtime, cache))

        dense_us = host_us(lambda: sdpa_attention_forward(module, query, key, value, None, scaling=0.25), args.calls)
        with stubbed_launches():
            for mode in ("direct", "dispatcher"):
                with through_dispatcher(mode == "dispatcher"):
                    rows.append({"mode": mode, "keys": args.keys,
                                 "attention_call_us": host_us(attention_call, args.calls),
                                 "key_encode_us": host_us(lambda: site.encode(key[:, :, -1:], value[:, :, -1:]),
                                                          args.calls),
                                 "sdpa_call_us": dense_us})
    lines = [["mode", "sparse attention call (us)", "key encode (us)", "sdpa call, with its compute (us)"]]
    lines += [[r["mode"], f"{r['attention_call_us']:.0f}", f"{r['key_encode_us']:.0f}", f"{r['sdpa_call_us']:.0f}"]
              for r in rows]
    print(format_table(lines))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "host_overhead.json"), {"torch": torch.__version__, "rows": rows})
    plot(rows, os.path.join(args.out, "host_overhead.png"))
    return 0


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2))
    labels = ["sparse attention call", "key encode", "sdpa call (with compute)"]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [row["attention_call_us"], row["key_encode_us"], row["sdpa_call_us"]]
        axis.bar([j + i * width for j in range(3)], values, width, label=row["mode"])
    axis.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(3)])
    axis.set_xticklabels(labels, fontsize=8)
    axis.set_ylabel("host us per call")
    axis.legend()
    axis.set_title("Host time of one decode layer (Triton launches stubbed)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
