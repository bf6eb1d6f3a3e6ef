"""One rank of the FX-route tensor-parallel tests (run by torchrun from test_tensor_parallel_fx.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 fx_tp_worker.py OUT_DIR

A small decoder whose attention is split by heads in two ways: torch's parallelize_module
(DTensor weights, ColwiseParallel q/k/v, RowwiseParallel o) and a model built with the rank's
heads only (plain weights, an all-reduce after the output projection, the heads declared with
optimize's tensor_parallel). Each is compiled with the "gsa" backend next to the whole model and
both decode the same tokens; what the test compares goes to OUT_DIR/rank{r}.pt."""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import gsa_compile
from gsa_compile import GSAConfig
from gsa_compile.capture.fx_examples import TinyDecoder

HEADS, KV_HEADS, LAYERS = 8, 4, 2
CASES = {"full_budget": 4096, "small_budget": 12}


class AllReduceLinear(nn.Linear):
    """A row-parallel output projection of plain tensors: each rank's heads' share, summed."""

    def forward(self, x):
        out = super().forward(x)
        dist.all_reduce(out)
        return out


def build() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder(vocab=64, hidden=64, heads=HEADS, kv_heads=KV_HEADS, layers=LAYERS).eval()


def dtensor_sharded(size: int) -> TinyDecoder:
    model, mesh = build(), init_device_mesh("cpu", (size,))
    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
            "o_proj": RowwiseParallel()}
    for attn in model.layers:
        parallelize_module(attn, mesh, plan)
        attn.heads, attn.kv_heads = attn.heads // size, attn.kv_heads // size
    return model


def local_heads(rank: int, size: int) -> TinyDecoder:
    model = build()
    for attn in model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = getattr(attn, name).weight.detach()
            rows = weight.shape[0] // size
            setattr(attn, name, nn.Linear(weight.shape[1], rows, bias=False))
            getattr(attn, name).weight.data.copy_(weight[rank * rows: (rank + 1) * rows])
        weight = attn.o_proj.weight.detach()
        columns = weight.shape[1] // size
        attn.o_proj = AllReduceLinear(columns, weight.shape[0], bias=False)
        attn.o_proj.weight.data.copy_(weight[:, rank * columns: (rank + 1) * columns])
        attn.heads, attn.kv_heads = attn.heads // size, attn.kv_heads // size
    return model.eval()


def decode(model, ids, steps: int = 4) -> torch.Tensor:
    cache = model.empty_cache()
    logits, cache = model(ids, cache)
    outputs = [logits[:, -1]]
    for _ in range(steps):
        logits, cache = model(logits[:, -1:].argmax(-1), cache)
        outputs.append(logits[:, -1])
    return torch.stack(outputs)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, budget in CASES.items():
        config = GSAConfig(num_hidden_layers=LAYERS, head_dim=8, hash_bits=16, chunk_size=4, budget_tokens=budget,
                           top_k_ratio_per_layer=[0.5] * LAYERS, must_select_blocks=[0, -1],
                           cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
        whole = gsa_compile.optimize(build(), config, compiler="eager")
        with torch.no_grad():
            dense, want = decode(build(), ids), decode(whole, ids)
        for how, model, declared in (("dtensor", dtensor_sharded(size), None),
                                     ("local_heads", local_heads(rank, size), (rank, size))):
            torch._dynamo.reset()
            model = gsa_compile.optimize(model, config, compiler="eager", tensor_parallel=declared)
            with torch.no_grad():
                got = decode(model, ids)
            results[(name, how)] = {
                "logits": got, "whole_logits": want, "dense_logits": dense,
                "sites": sum(len(report.sites) for report in model.gsa.reports),
                "weights": dict(model.gsa.codes.hash_weights),
                "whole_weights": dict(whole.gsa.codes.hash_weights),
            }
        torch._dynamo.reset()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
