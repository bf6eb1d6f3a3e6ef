"""End-to-end decode speed under tensor parallelism: a Llama-3.1-70B-shaped transformers model
(random weights, bf16) sharded by transformers' tp_plan over the GPUs of one host, GSA against
the dense paths, through the same generate() paths and timing as benchmarks/e2e_generate.py.

    torchrun --standalone --nproc_per_node 2 benchmarks/e2e_tp.py --out e2e_tp_out      # 2 GPUs
    torchrun --standalone --nproc_per_node 2 benchmarks/e2e_tp.py --layers 40 --shapes 8x65536,8x131072
    torchrun --standalone --nproc_per_node 2 benchmarks/e2e_tp.py --tiny --layers 4 --shapes 2x256 \
        --new-tokens 4 --out /tmp/e2e_tp                                                  # CPU (gloo)

Every rank holds its share of the heads (and of the MLP), its KV cache and codes for its KV
heads, and its sites their heads' rows of the hash weights: the attention runs with no
collective of its own; the row-wise projections all-reduce as in any TP model. The model is
built on the meta device and sharded by transformers (the steps from_pretrained(tp_plan="auto")
takes), then each rank fills its shards with random numbers: no checkpoint is read. Shapes that
do not fit in a GPU (weights + static cache + codes, per rank) are listed as such, not run.
Rank 0 prints the table (tokens/s of the whole batch) and writes e2e_tp.json."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.distributed.configuration_utils import DistributedConfig

from gsa_compile.sharding import is_dtensor
from gsa_compile.tables import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_generate import (TINY, add_run_arguments, agreement, copy_bandwidth, optimize_for_run,  # noqa: E402
                          parse_run_arguments, run_shape, table, weight_bytes)

LLAMA_31_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                    head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=262144)


def build_sharded(layers: int, tiny: bool, device: torch.device) -> LlamaForCausalLM:
    """The model sharded over every rank by its tp_plan, each rank's shards random."""
    shape = TINY if tiny else LLAMA_31_70B
    config = LlamaConfig(num_hidden_layers=layers, eos_token_id=None, attn_implementation="sdpa", **shape)
    distributed, _, meshes = LlamaForCausalLM.prepare_distribute_model(
        DistributedConfig(tp_plan="auto", tp_size=dist.get_world_size()))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = LlamaForCausalLM.maybe_distribute_model(model, distributed, meshes)
    dtype = torch.float32 if tiny else torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(dist.get_rank())
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            local = parameter.to_local() if is_dtensor(parameter) else parameter
            data = torch.empty(local.shape, dtype=dtype, device=device)
            if name == "weight" and local.dim() == 1:
                data.fill_(1.0)  # norms
            else:
                data.normal_(0.0, config.initializer_range, generator=generator)
            if is_dtensor(parameter):
                from torch.distributed.tensor import DTensor

                data = DTensor.from_local(data, parameter.device_mesh, parameter.placements, run_check=False,
                                          shape=parameter.shape, stride=parameter.stride())
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    # Buffers made on the meta device (rotary frequencies) are made again on the device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model.eval()


def fits(model, batch: int, prompt: int, args) -> tuple[bool, float]:
    """Whether the rank's weights, static cache and codes of a shape fit its GPU (and the GB needed)."""
    config, runtime = model.config, model.gsa_runtime
    positions = batch * (prompt + args.new_tokens)
    needed = weight_bytes(model)
    for layer, site in runtime.sites.items():
        needed += positions * site.shape.kv_heads * config.head_dim * 2 * model.dtype.itemsize
        if site.policy == "sparse":
            needed += positions * site.shape.kv_heads * runtime.config.hash_bits // 8
    if not torch.cuda.is_available():
        return True, needed / 1e9
    return needed * args.headroom < torch.cuda.get_device_properties(0).total_memory, needed / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # At 80 layers a batch of 8 at 64K or 128K tokens does not fit two 141 GB GPUs (the table
    # says so); --layers 40 makes room for them.
    add_run_arguments(parser, layers=80, shapes="8x32768,4x65536,2x131072,8x65536,8x131072")
    parser.add_argument("--headroom", type=float, default=1.15,
                        help="memory factor over weights + cache + codes a shape needs to run")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, gloo (smoke test)")
    parser.add_argument("--out", default="e2e_tp_out")
    args = parse_run_arguments(parser, argv)

    device_type = "cpu" if args.tiny else "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("gloo" if args.tiny else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if rank:
        sys.stdout = open(os.devnull, "w")  # one table: rank 0's (every rank times the same steps)
    os.makedirs(args.out, exist_ok=True)

    model = build_sharded(args.layers, args.tiny, device)
    model = optimize_for_run(model, args)
    print(model.gsa_report, flush=True)
    site = next(iter(model.gsa_runtime.computing_sites()), None)
    bandwidth = copy_bandwidth(device_type)
    report = {"model": {"layers": args.layers, **(TINY if args.tiny else LLAMA_31_70B)}, "tensor_parallel": world,
              "device": device_type, "torch": torch.__version__, "copy_bandwidth_gbs": bandwidth / 1e9,
              "new_tokens": args.new_tokens, "budget_tokens": args.budget_tokens,
              "kv_heads_per_rank": None if site is None else site.shape.kv_heads,
              "weights_gb_per_rank": weight_bytes(model) / 1e9, "rows": []}
    if device_type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for shape in args.shapes.split(","):
        batch, prompt = (int(x) for x in shape.split("x"))
        room, needed = fits(model, batch, prompt, args)
        print(f"batch {batch}, prompt {prompt}: {needed:.1f} GB per rank", flush=True)
        if not room:
            report["rows"].append({"batch": batch, "prompt": prompt, "path": "-",
                                   "error": f"does not fit: {needed:.1f} GB per GPU (x{args.headroom} headroom)"})
            continue
        rows = run_shape(model, batch, prompt, args, device_type, bandwidth)
        report["rows"].extend({**row, "gb_per_rank": needed} for row in rows)
        if rank == 0:
            write_json(os.path.join(args.out, "e2e_tp.json"), report)
    if args.agreement:
        report["agreement"] = agreement(model, args, device_type)
        print("full-budget agreement:", report["agreement"], flush=True)
    if rank == 0:
        write_json(os.path.join(args.out, "e2e_tp.json"), report)
    print(table(report["rows"]), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
