"""gsa_compile.export: an ExportedProgram whose attention is GSA (CPU, seconds).

    python examples/export_program.py

Exports a decode step of a tiny decoder (one new token against a cached prompt), prints the
sites the passes rewrote and the gsa ops in the program's graph, and runs the program."""

import collections

import torch

import gsa_compile
from gsa_compile.capture.fx_examples import TinyDecoder


def main():
    torch.manual_seed(0)
    model = TinyDecoder(layers=4).eval()
    with torch.no_grad():
        _, cache = model(torch.randint(0, 64, (1, 40)), model.empty_cache())
    token = torch.randint(0, 64, (1, 1))
    config = gsa_compile.GSAConfig.for_model(model, chunk_size=8, budget_tokens=16, must_select_blocks=[0, -1],
                                             cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
    program = gsa_compile.export(model, (token, cache), config=config)
    print(program.gsa_report.table())
    ops = collections.Counter(str(node.target) for node in program.graph.nodes if "gsa." in str(node.target))
    print("gsa ops in the program:", dict(ops))
    with torch.no_grad():
        sparse, _ = program.module()(token, cache)
        dense, _ = model(token, cache)
    print(f"decode step: max |logit difference| vs dense = {(sparse - dense).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
