"""GPU decode-attention benchmark (issue 4): GSA Triton kernels vs dense SDPA, FlexAttention
with the same selection, and a naive PyTorch gather, side by side on one CUDA device.

    python benchmarks/gpu_bench.py --out bench_out            # same as: gsa-compile bench
    python benchmarks/gpu_bench.py --sweep --skip flex,naive  # kernel tile variants too

Prints a table and writes bench_out/bench.json and bench_out/bench.png. The measurement code
is gsa_compile/commands/bench.py, shared with the CLI."""

import argparse
import logging
import sys

from gsa_compile.commands import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.register(parser.add_subparsers(dest="command", required=False))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
