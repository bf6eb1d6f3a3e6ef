"""The accuracy benchmark of docs/accuracy.md: a thin caller of `gsa-compile eval`
(gsa_compile/accuracy/evaluate.py holds the implementation).

    gsa-compile calibrate --out build/accuracy_hashes --sigma 3 --seed 1235
    python benchmarks/accuracy/eval_accuracy.py --hash-config build/accuracy_hashes/gsa_config.json
    python benchmarks/accuracy/eval_accuracy.py --samples 4     # any eval option overrides the run below

    # the head-dim-128 model (trained into build/geometry128, hashes by calibrate_recall.py):
    python benchmarks/accuracy/eval_accuracy.py geometry128 --hash-config build/g128_hashes/gsa_config.json \\
        --device cuda

    # one result, table and plot from runs over different lengths (same other settings):
    python benchmarks/accuracy/eval_accuracy.py merge OUT.json RUN_4096.json RUN_8192.json ...
"""

import json
import os
import sys

from gsa_compile.cli import main

# The run docs/accuracy.md reports: 2K/4K/8K, 20 samples per task and length, chunk 16 with
# must-select [0, -1] (at 8K a 1.56% budget is 128 tokens, below chunk 128's must-select floor),
# layer 0 dense under every rule; without --hash-config the hashes are calibrated first, with
# sigma 3 (see docs/accuracy.md).
DOCUMENTED_RUN = [
    "eval", "--lengths", "2048,4096,8192", "--samples", "20", "--chunk-size", "16", "--must-select", "0,-1",
    "--dense-layers", "0", "--sigma", "3", "--json", "docs/accuracy_results.json", "--plot", "docs/accuracy_plot.png",
]

# The head-dim-128 model (docs/accuracy.md, "The head-dim-128 model"): the same rules, budgets,
# chunk and must-select blocks at 4K/8K/16K, the model read from build/geometry128 (where
# train_accuracy_model.py --model geometry128 --out-dir build/geometry128 puts it).
GEOMETRY128_RUN = [
    "eval", "--model", "build/geometry128", "--lengths", "4096,8192,16384", "--samples", "20", "--chunk-size", "16",
    "--must-select", "0,-1", "--dense-layers", "0", "--batch-size", "4", "--json", "docs/accuracy_geometry128.json",
    "--plot", "docs/accuracy_geometry128.png",
]
# batch 4: float32 SDPA with GQA may fall back to the math kernel, whose prefill at 16K holds
# B * 8 heads * L^2 * 4 bytes twice (68 GiB at batch 4)

RUNS = {"geometry128": GEOMETRY128_RUN}


def merge(out: str, parts: list[str]) -> int:
    from gsa_compile.accuracy.evaluate import merge_results, plot, summary_table
    from gsa_compile.tables import write_json

    results = []
    for path in parts:
        with open(path) as handle:
            results.append(json.load(handle))
    merged = merge_results(results)
    write_json(out, merged)
    plot(merged, os.path.splitext(out)[0] + ".png")
    print(summary_table(merged))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["merge"]:
        if len(args) < 3:
            sys.exit("usage: eval_accuracy.py merge OUT.json RUN.json [RUN.json ...]")
        sys.exit(merge(args[1], args[2:]))
    run = RUNS[args.pop(0)] if args and args[0] in RUNS else DOCUMENTED_RUN
    sys.exit(main(run + args))
