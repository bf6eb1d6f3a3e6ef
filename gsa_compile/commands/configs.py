"""`gsa-compile configs`: list the shipped model configs or show one."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("configs", help="list shipped GSA configs, or show one")
    parser.add_argument("name", nargs="?", help="model name (e.g. Qwen/Qwen3-4B) or a JSON path to show")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..config import load_config, shipped_config_names
    from ..tables import format_table

    if args.name:
        print(load_config(args.name).to_json())
        return 0
    rows = [("model", "layers", "sparse", "dense", "reuse", "bits", "chunk", "gpu thr (len/conc)")]
    for name in shipped_config_names():
        config = load_config(name)
        policies = [config.layer_policy(layer) for layer in range(config.num_hidden_layers)]
        rows.append((
            name, str(config.num_hidden_layers), str(policies.count("sparse")), str(policies.count("dense")),
            str(policies.count("reuse")), str(config.hash_bits), str(config.chunk_size),
            f"{config.gpu_seq_len_threshold}/{config.gpu_concurrency_threshold}",
        ))
    print(format_table(rows))
    return 0
