"""The accuracy benchmark of docs/accuracy.md: a thin caller of `gsa-compile eval`
(gsa_compile/accuracy/evaluate.py holds the implementation).

    gsa-compile calibrate --out build/accuracy_hashes --sigma 3 --seed 1235
    python benchmarks/accuracy/eval_accuracy.py --hash-config build/accuracy_hashes/gsa_config.json
    python benchmarks/accuracy/eval_accuracy.py --samples 4     # any eval option overrides the run below
"""

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

if __name__ == "__main__":
    sys.exit(main(DOCUMENTED_RUN + sys.argv[1:]))
