"""One rank of the tensor-parallel tests (run by torchrun from test_tensor_parallel.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tp_worker.py OUT_DIR MODEL_DIR WEIGHTS

Every rank loads the saved model twice, sharded by transformers (tp_plan="auto") and whole,
runs the same greedy generation through both with GSA for each case, and writes what the test
compares to OUT_DIR/rank{r}.pt."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from gsa_compile import GSAConfig
from gsa_compile.capture.hf import gsa_disabled, optimize_transformers

PROMPT = 40
NEW_TOKENS = 6
# name -> (GSAConfig overrides, generate() overrides)
CASES = {
    "full_budget": (dict(budget_tokens=4096), {}),
    "small_budget": (dict(budget_tokens=16), {}),
    "small_budget_static": (dict(budget_tokens=16), dict(cache_implementation="static")),
    "small_budget_fixed": (dict(budget_tokens=16, hash_weight_type="fixed"), {}),
}


def generate(model, ids, mask, options):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, **options)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores)


def main(out_dir: str, model_dir: str, weights: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sharded = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    whole = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, whole.config.vocab_size, (2, PROMPT), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    base = GSAConfig.for_model(whole).replace(
        chunk_size=4, must_select_blocks=[0, -1], cpu_seq_len_threshold=0, cpu_concurrency_threshold=0,
        top_k_ratio_per_layer=[0.5] * whole.config.num_hidden_layers,
        top_k_index_reuse=[-1, 0] + [-1] * (whole.config.num_hidden_layers - 2), hash_weight=weights)
    results = {}
    for name, (overrides, options) in CASES.items():
        config = base.replace(**overrides)
        optimize_transformers(sharded, config)
        optimize_transformers(whole, config)
        tokens, scores = generate(sharded, ids, mask, options)
        whole_tokens, whole_scores = generate(whole, ids, mask, options)
        with gsa_disabled(whole):
            dense_tokens, dense_scores = generate(whole, ids, mask, options)
        sites = sharded.gsa_runtime.computing_sites()
        results[name] = {
            "tokens": tokens, "scores": scores, "whole_tokens": whole_tokens, "whole_scores": whole_scores,
            "dense_tokens": dense_tokens, "dense_scores": dense_scores,
            "sparse_calls": sharded.gsa_runtime.total_stats().sparse_calls,
            "shards": {site.layer: site.shape.shard for site in sites},
            "weights": {site.layer: site.hash_weight for site in sites},
            "whole_weights": {site.layer: whole.gsa_runtime.sites[site.layer].hash_weight for site in sites},
        }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
