"""GPU decode-attention benchmark: GSA Triton kernels vs dense SDPA on one CUDA device.

    python benchmarks/gpu_bench.py                     # head geometries 32/8, 64/8, 32/2 (batch 1, 8)
                                                       # and 32/32 (batch 1) at 128K keys, 2048 tokens;
                                                       # writes their table into docs/gpu.md
    python benchmarks/gpu_bench.py --full --out bench_out   # same as: gsa-compile bench (cache-length
                                                            # sweep, FlexAttention, naive gather)
    python benchmarks/gpu_bench.py --full --sweep attend,select --skip flex,naive  # kernel tile variants

Prints a table and writes bench_out/bench.json (and bench.png for --full). The measurement code
is gsa_compile/commands/bench.py, shared with the CLI."""

import argparse
import logging
import os
import sys

from gsa_compile.commands import bench

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "gpu.md")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    full = "--full" in argv
    if full:
        argv.remove("--full")
    elif "--geometries" not in argv:
        argv = ["--geometries", bench.DEFAULT_GEOMETRIES, "--docs", DOCS, *argv]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.register(parser.add_subparsers(dest="command", required=False))
    args = parser.parse_args(["bench", *argv])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
