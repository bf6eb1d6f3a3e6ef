"""Coverage of `gsa_compile.optimize` over every causal LM of the installed transformers.

    python benchmarks/coverage.py                       # every architecture (incremental JSON)
    python benchmarks/coverage.py --sample 10           # 10 architectures spread over the list
    python benchmarks/coverage.py --only llama,bloom    # these, merged into the existing JSON
    python benchmarks/coverage.py --workers 2           # two architectures at a time
    python benchmarks/coverage.py --table-only          # docs/coverage.md from the JSON files

Each architecture of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES is built from a tiny random config
(hidden 64, 3 layers or the fewest that hold a full-attention layer, 4 query / 2 KV heads, vocab
128, fp32) in a forked process with a timeout, then optimized with `gsa_compile.optimize`, which
serves it through the Hugging Face route (the attention interface) or, when its attention
modules do not call transformers' AttentionInterface, the FX route (the "gsa" torch.compile
backend, with Inductor by default); the "route" column says which:

1. full budget (ratio 0.999 on every layer, thresholds 0, chunk 16): greedy `generate` must give
   the tokens the original model gives;
2. small budget (32 tokens, must-select [0, -1]) on a longer prompt: the sparse path must run
   (HF: site.stats.sparse_calls > 0; FX: select_blocks calls at the kernel dispatcher > 0),
   unless every site is dense for a reason the report or the site's dense_reasons state; a site
   reported sparse that made no sparse call and gave no reason is "silently dense", a failure.

Outcomes: pass, dense (a stated policy reason), refused (an optimize error naming what the
model lacks), fail, timeout; not counted: no_attention (no attention layer at all) and
unbuildable (the tiny config or model cannot be built here).
Writes benchmarks/results/coverage_hf.json after every architecture and docs/coverage.md at the
end (with the FX sweep's benchmarks/results/coverage_fx.json beside it when that file exists).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import logging
import multiprocessing
import os
import sys
import time
import traceback
from collections import Counter
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_JSON = os.path.join(HERE, "results", "coverage_hf.json")
FX_JSON = os.path.join(HERE, "results", "coverage_fx.json")
TABLE_MD = os.path.join(ROOT, "docs", "coverage.md")

VOCAB = 128
LAYERS = 3
MAX_LAYERS = 8  # hybrids whose first attention layer comes late get more layers, up to this
PROMPT = 24
LONG_PROMPT = 80
NEW_TOKENS = 6
CHUNK = 16
FULL_RATIO = 0.999
SMALL_BUDGET = 32
# What the FX route hands the rewritten graph to: optimize()'s default.
FX_COMPILER = "inductor"

# Sizes applied to every config that has the attribute (names or attribute_map aliases).
TINY = dict(
    hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=512, rotary_dim=8,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1,
    n_group=1, topk_group=1, first_k_dense_replace=1,
    # the model's own key selection (DSA indexers) picks fewer keys than the prompt holds
    index_topk=8,
    # MLA
    kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    # linear attention / state-space layers
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16, mamba_head_dim=16, ssm_state_size=16, state_size=16,
    mamba_n_groups=1, n_groups=1, time_step_rank=8,
    # decoders of encoder-decoder families
    d_model=64, decoder_layers=LAYERS, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
    decoder_ffn_dim=96, encoder_ffn_dim=96,
)
# Sub-configs of multimodal families that are shrunk, with their layers (None: the text's).
SUB_CONFIG_LAYERS = {
    "text_config": None, "vision_config": 1, "audio_config": 1,
    # the byte-level stacks of BLT
    "patcher_config": 1, "encoder_config": 1, "decoder_config": None, "global_config": None,
}
TOKENS = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0)

# Layer patterns that must match the number of layers, per model type.
OVERRIDES: dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1]),  # no attention layer by default
    "falcon_h1": dict(mamba_d_ssm=128),  # 8 Mamba heads of 16
    "gemma3n_text": dict(num_kv_shared_layers=0),  # the default shares more layers than 3
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),  # none by default
    "zamba2": dict(layer_types=["linear_attention", "hybrid", "linear_attention"]),
    "zaya": dict(num_experts_per_tok=1),
}

logger = logging.getLogger("coverage")


class Unbuildable(Exception):
    """The tiny model cannot be built here (a missing package, a config this sweep cannot shrink)."""


# ---------------------------------------------------------------------- building
def architectures() -> list[tuple[str, str]]:
    """(model_type, class name) of every causal LM of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def tiny_config(model_type: str, model_class, layers: int = LAYERS):
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    if getattr(config_class, "sub_configs", None) and model_class.config_class is not config_class:
        # A multimodal family's causal LM takes its text (or decoder) config.
        config_class = model_class.config_class
    kwargs = _tiny_kwargs(config_class, layers)
    default = None
    for name, sub_class in getattr(config_class, "sub_configs", {}).items():
        # The text model gets the tiny sizes, encoders of other modalities one tiny layer; other
        # sub-configs (a family's attention or MoE settings) keep their defaults.
        if name not in SUB_CONFIG_LAYERS:
            continue
        sub_layers = SUB_CONFIG_LAYERS[name] or layers
        if sub_class.__name__ != "AutoConfig":
            kwargs[name] = _tiny_kwargs(sub_class, sub_layers)
            continue
        # A sub-config of any model type: the family's default one, shrunk.
        default = default or config_class()
        sub_default = getattr(default, name, None)
        if sub_default is not None and hasattr(sub_default, "model_type"):
            kwargs[name] = {"model_type": sub_default.model_type, **_tiny_kwargs(type(sub_default), sub_layers)}
    kwargs.update(OVERRIDES.get(model_type, {}))
    return config_class(**kwargs)


def _tiny_kwargs(config_class, layers: int) -> dict:
    default = config_class()
    sizes = {**TINY, "num_hidden_layers": layers, "decoder_layers": layers}
    if _attribute(default, "kv_lora_rank"):
        # MLA: one key per query head, the head dim follows from the rope and nope dims.
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
        del sizes["head_dim"]
    return {name: value for name, value in {**sizes, **TOKENS}.items() if _has(default, name) and
            not _read_only(config_class, name)}


def _read_only(config_class, name: str) -> bool:
    """A derived attribute (a property without setter, e.g. Falcon's head_dim)."""
    attribute = getattr(config_class, name, None)
    return isinstance(attribute, property) and attribute.fset is None


def _has(config, name: str) -> bool:
    try:
        getattr(config, name)
    except Exception:  # missing, or a per-layer attribute refusing global access (Gemma 4)
        return name in getattr(config, "__dataclass_fields__", {})
    return True


def _attribute(config, name: str):
    from gsa_compile.config import config_attribute

    return config_attribute(config, name)


def has_full_attention_layer(model) -> bool:
    """Whether some attention module of the model is neither cross-attention nor sliding-window
    (a hybrid of 3 layers may hold only linear-attention or sliding layers)."""
    from gsa_compile.capture.hf_sites import attention_modules, is_sliding

    try:
        return any(not is_sliding(module) for _, module in attention_modules(model))
    except Exception:  # discovery itself fails on this model: the check reports it
        return True


def build(model_type: str, class_name: str):
    """The tiny model (seeded), with the fewest layers from LAYERS up that hold a full-attention layer."""
    import transformers

    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise Unbuildable(f"transformers has no class {class_name}")
    model = smallest = None
    for layers in range(LAYERS, MAX_LAYERS + 1):
        try:
            config = tiny_config(model_type, model_class, layers)
            torch.manual_seed(0)
            model = model_class(config).eval()
        except Exception as exc:  # a tiny config the family refuses
            raise Unbuildable(f"{type(exc).__name__}: {_first_line(exc)}") from exc
        smallest = model if smallest is None else smallest
        if has_full_attention_layer(model):
            break
    else:
        # No layer count gives an interface attention layer: a model whose attention modules
        # compute attention themselves (the FX route's), at the smallest size.
        model = smallest
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = None, 0, 1
    return model


# ---------------------------------------------------------------------- checking
def gsa_configs(model):
    from gsa_compile import GSAConfig

    base = GSAConfig.for_model(model)
    layers = base.num_hidden_layers
    common = dict(
        chunk_size=CHUNK, top_k_index_reuse=[-1] * layers, cpu_seq_len_threshold=0, cpu_concurrency_threshold=0,
        gpu_seq_len_threshold=0, gpu_concurrency_threshold=0, must_select_blocks=[0, -1],
    )
    full = base.replace(top_k_ratio_per_layer=[FULL_RATIO] * layers, **common)
    small = full.replace(budget_tokens=SMALL_BUDGET)
    return full, small


def _generate(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True,  # decode over a KV cache, also where the config's default is off (MPT)
        )


def _site_records(model) -> list[dict]:
    records = []
    report = {site.layer: site for site in model.gsa_report.sites}
    for layer, site in sorted(model.gsa_runtime.sites.items()):
        stats = site.stats
        reasons = dict(getattr(stats, "dense_reasons", {}) or {})
        records.append(dict(
            layer=layer, policy=site.policy, note=report[layer].note, module=report[layer].module_path,
            sparse_calls=int(stats.sparse_calls), dense_reasons={k: int(v) for k, v in reasons.items()},
        ))
    return records


def _stated_reasons(site: dict) -> list[str]:
    """Why a site made no sparse call, when the report or its counters say so."""
    from gsa_compile.decode import DENSE_REASONS

    reasons = [site["note"]] if site["policy"] == "dense" and site["note"] else []
    counted = [reason for reason in site["dense_reasons"] if reason not in UNSTATED_REASONS]
    return reasons + [DENSE_REASONS.get(reason, reason) for reason in counted]


def check_model(model_type: str, class_name: str, fx_compiler: str = FX_COMPILER) -> dict:
    """One architecture through `gsa_compile.optimize` (see the module docstring); "route" says
    which route served it: "hf" (the attention interface) or "fx" (the torch.compile backend,
    for models whose attention does not call the interface)."""
    import gsa_compile
    from gsa_compile.capture.hf import not_interface_reason
    from gsa_compile.capture.hf_sites import discover
    from gsa_compile.errors import GSAError

    result: dict = {"model_type": model_type, "class": class_name}
    try:
        original = build(model_type, class_name)
    except Unbuildable as exc:
        return {**result, "status": "unbuildable", "reason": str(exc)}
    result["layers"] = int(getattr(original.config.get_text_config(), "num_hidden_layers", 0) or 0)
    found = discover(original)
    if not found.self_attention and not found.not_routed:
        return {**result, "status": "no_attention", "stage": "optimize",
                "reason": "no attention module (state-space or recurrent layers)"}
    fx_reason = not_interface_reason(original, found)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=generator)
    long_prompt = torch.randint(3, VOCAB, (1, LONG_PROMPT), generator=generator)
    try:
        expected = _generate(original, prompt, NEW_TOKENS)
    except Exception as exc:
        return {**result, "status": "unbuildable", "reason": f"dense generate: {type(exc).__name__}: {_first_line(exc)}"}
    result["route"] = "fx" if fx_reason else "hf"
    if fx_reason:
        result["route_reason"] = fx_reason
        return _check_fx(result, original, fx_compiler, prompt, long_prompt, expected)
    stage = "optimize"
    try:
        full, small = gsa_configs(original)
        model = gsa_compile.optimize(copy.deepcopy(original), full)
        result["sites"] = model.gsa_report.counts()
        stage = "generate (full budget)"
        got = _generate(model, prompt, NEW_TOKENS)
        result["tokens_equal"] = bool(torch.equal(got, expected))
        stage = "generate (small budget)"
        model = gsa_compile.optimize(model, small)
        _generate(model, long_prompt, NEW_TOKENS)
    except GSAError as exc:
        refused = "AttentionInterface" in str(exc)
        return {**result, "status": "refused" if refused else "fail", "stage": stage,
                "reason": f"{type(exc).__name__}: {_first_line(exc)}"}
    except Exception as exc:
        return {**result, "status": "fail", "stage": stage, "reason": f"{type(exc).__name__}: {_first_line(exc)}",
                "traceback": traceback.format_exc(limit=-4)}
    sites = _site_records(model)
    result["site_records"] = sites
    result["sparse_calls"] = int(model.gsa_runtime.total_stats().sparse_calls)
    silent = [site["layer"] for site in sites if site["sparse_calls"] == 0 and not _stated_reasons(site)]
    reasons = sorted({reason for site in sites if site["sparse_calls"] == 0 for reason in _stated_reasons(site)})
    result["dense_reasons"] = reasons
    if not result["tokens_equal"]:
        return {**result, "status": "fail", "reason": "greedy tokens differ from the original model at full budget"}
    if silent:
        return {**result, "status": "fail",
                "reason": f"silently dense: layers {silent} not reported dense, 0 sparse calls, no reason given"}
    if result["sparse_calls"] == 0:
        return {**result, "status": "dense", "reason": "; ".join(reasons)}
    return {**result, "status": "pass"}


def _check_fx(result: dict, original, compiler: str, prompt, long_prompt, expected) -> dict:
    """The FX route's check, as the HF route's: `optimize` + greedy generate equal to the original
    at full budget; at the small budget the sparse path must select blocks (select_blocks calls
    counted at the kernel dispatcher, which every gsa op goes through)."""
    import gsa_compile
    from gsa_compile import kernels

    calls: Counter = Counter()
    dispatch = kernels.dispatch

    def counted(op, *args, **kwargs):
        calls[op] += 1
        return dispatch(op, *args, **kwargs)

    stage = "optimize"
    kernels.dispatch = counted
    try:
        full, small = gsa_configs(original)
        model = gsa_compile.optimize(copy.deepcopy(original), full, compiler=compiler)
        stage = "generate (full budget)"
        got = _generate(model, prompt, NEW_TOKENS)
        result["tokens_equal"] = bool(torch.equal(got, expected))
        result["sites"] = _fx_sites(model)
        stage = "generate (small budget)"
        model = gsa_compile.optimize(copy.deepcopy(original), small, compiler=compiler)
        calls.clear()
        _generate(model, long_prompt, NEW_TOKENS)
    except Exception as exc:
        return {**result, "status": "fail", "stage": stage, "reason": f"{type(exc).__name__}: {_first_line(exc)}",
                "traceback": traceback.format_exc(limit=-4)}
    finally:
        kernels.dispatch = dispatch
    result["sparse_calls"] = int(calls["select_blocks"])
    result["fx_compiler"] = compiler
    unmatched = sorted({item.reason for report in model.gsa.reports for item in report.unmatched})
    result["dense_reasons"] = unmatched
    if not result["tokens_equal"]:
        return {**result, "status": "fail", "reason": "greedy tokens differ from the original model at full budget"}
    if not result["sites"]["sparse"]:
        return {**result, "status": "fail", "reason": "the FX route found no sparse attention site: "
                + ("; ".join(unmatched)[:300] or "no candidate")}
    if result["sparse_calls"] == 0:
        return {**result, "status": "fail", "reason": "silently dense: sparse sites made no select_blocks call"}
    return {**result, "status": "pass"}


def _fx_sites(model) -> dict:
    """Site counts of the decode graph (the last the FX route compiled: generate's dynamic step)."""
    reports = model.gsa.reports
    return reports[-1].counts() if reports else {"sparse": 0, "dense": 0, "reuse": 0}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


# ---------------------------------------------------------------------- running
def _child(model_type: str, class_name: str, fx_compiler: str, connection) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    try:
        connection.send(check_model(model_type, class_name, fx_compiler))
    except BaseException as exc:  # anything the check itself did not classify
        connection.send({"model_type": model_type, "class": class_name, "status": "fail",
                         "reason": f"{type(exc).__name__}: {_first_line(exc)}"})
    connection.close()


def run_isolated(model_type: str, class_name: str, timeout: float, fx_compiler: str = FX_COMPILER) -> dict:
    """check_model in a forked process, so a hang or a crash costs one architecture."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(model_type, class_name, fx_compiler, sender), daemon=True)
    start = time.monotonic()
    process.start()
    sender.close()
    result: Optional[dict] = None
    if receiver.poll(timeout):
        try:
            result = receiver.recv()
        except EOFError:
            result = None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if result is None:
        status = "timeout" if time.monotonic() - start >= timeout else "fail"
        reason = f"no result within {timeout:.0f} s" if status == "timeout" else f"process died (exit code {process.exitcode})"
        result = {"model_type": model_type, "class": class_name, "status": status, "reason": reason}
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def sample(items: list, count: int) -> list:
    """`count` items spread evenly over the list (deterministic)."""
    if count >= len(items):
        return items
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


# Dense-call reasons that do not say why a layer never runs sparse (every layer counts prefill;
# "dense_layer" is stated by the report's note).
UNSTATED_REASONS = ("prefill", "dense_layer")
STATUSES = ("pass", "dense", "refused", "fail", "timeout", "no_attention", "unbuildable")
NOT_COUNTED = ("no_attention", "unbuildable")


def totals(results: dict) -> dict:
    counts = Counter(result["status"] for result in results.values())
    buildable = sum(counts[status] for status in STATUSES if status not in NOT_COUNTED)
    good = counts["pass"] + counts["dense"]
    by_route = {}
    for result in results.values():
        if result["status"] not in NOT_COUNTED:
            by_route.setdefault(result.get("route", "-"), Counter())[result["status"]] += 1
    return {"architectures": len(results), "buildable": buildable, **{s: counts[s] for s in STATUSES},
            "pass_or_stated_dense_percent": _percent(good, buildable),
            "by_route": {route: dict(sorted(route_counts.items())) for route, route_counts in sorted(by_route.items())}}


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, help="only N architectures spread over the list")
    parser.add_argument("--only", help="comma-separated model types; merged into the existing JSON")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per architecture")
    parser.add_argument("--json", default=RESULTS_JSON)
    parser.add_argument("--markdown", default=TABLE_MD, help="table to write ('' for none)")
    parser.add_argument("--fx", default=FX_JSON, help="the FX route's results, merged into the table if present")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON files, run nothing")
    parser.add_argument("--workers", type=int, default=1, help="architectures checked at a time (one process each)")
    parser.add_argument("--fx-compiler", default=FX_COMPILER, choices=("inductor", "aot_eager", "eager"),
                        help="what the FX route hands its graphs to (optimize's default: inductor)")
    args = parser.parse_args(argv)
    if args.table_only:
        write_markdown(args.markdown, _load(args.json)["results"], _load(args.fx))
        return 0

    from tqdm import tqdm

    from gsa_compile.tables import write_json

    items = architectures()
    results: dict = {}
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {model_type for model_type, _ in items}
        if unknown:
            parser.error(f"not causal LMs of this transformers: {sorted(unknown)}")
        items = [item for item in items if item[0] in wanted]
        if os.path.exists(args.json):
            with open(args.json) as handle:
                results = json.load(handle)["results"]
    if args.sample:
        items = sample(items, args.sample)
    import transformers

    import gsa_compile.capture.hf  # noqa: F401  (imported once here: every forked check runs this code)

    environment = {"torch": torch.__version__, "transformers": transformers.__version__,
                   "fx_compiler": args.fx_compiler}
    progress = tqdm(total=len(items), unit="model", file=sys.stderr)
    # Threads only wait on the forked checks; results are merged and written here, one at a time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {pool.submit(run_isolated, model_type, class_name, args.timeout, args.fx_compiler): model_type
                   for model_type, class_name in items}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            progress.set_postfix_str(futures[future])
            progress.update()
            write_json(args.json, {"environment": environment, "totals": totals(results), "results": results})
    summary = totals(results)
    print(json.dumps(summary, indent=2))
    if args.markdown:
        write_markdown(args.markdown, results, _load(args.fx))
    return 0


def _load(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_markdown(path: str, results: dict, fx: Optional[dict]) -> None:
    summary = totals(results)
    lines = ["# Coverage over transformers causal LMs", ""]
    lines += [
        "Every architecture of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built from a tiny "
        "random config (hidden 64, 3 layers or the fewest holding a full-attention layer, 4 query / 2 KV "
        "heads, vocab 128, fp32), optimized with `gsa_compile.optimize`: the Hugging Face route (hf) where the "
        "model's attention calls transformers' AttentionInterface, else the FX route (fx, the `gsa` torch.compile "
        "backend; the compiler in brackets). At full budget (ratio 0.999, thresholds 0, chunk 16) greedy "
        "`generate` must give the tokens of the original model, and at a 32-token budget the sparse path must run "
        "(hf: the sites' sparse calls, fx: select_blocks calls). Regenerate with `python benchmarks/coverage.py`.",
        "",
        "| outcome | meaning | architectures |",
        "| --- | --- | --- |",
        f"| pass | tokens equal at full budget, sparse calls at a small budget | {summary['pass']} |",
        f"| dense | tokens equal; every site dense for a stated reason (below) | {summary['dense']} |",
        f"| refused | optimize refuses the model, naming what it lacks | {summary['refused']} |",
        f"| fail | an error, tokens differ, or a site silently dense | {summary['fail']} |",
        f"| timeout | no result in the per-model time limit | {summary['timeout']} |",
        f"| no_attention | no attention layer at all (Mamba, xLSTM; not counted) | {summary['no_attention']} |",
        f"| unbuildable | the tiny model cannot be built here (not counted) | {summary['unbuildable']} |",
        "",
        f"Buildable: {summary['buildable']} of {summary['architectures']}; pass or dense by a stated reason: "
        f"{summary['pass'] + summary['dense']} ({summary['pass_or_stated_dense_percent']}%). By the route "
        f"`optimize` took: " + "; ".join(
            f"{ROUTE_NAMES.get(route, route)}: " + ", ".join(f"{status} {count}" for status, count in counts.items())
            for route, counts in summary["by_route"].items()) + ".",
        "",
    ]
    fx_results = _fx_results(fx)
    if fx_results:
        fx_counts = Counter(result.get("status") for result in fx_results.values())
        fx_buildable = sum(count for status, count in fx_counts.items() if status not in NOT_COUNTED)
        lines += [
            f"FX sweep (`torch.compile(model, backend=\"gsa\")` on every architecture, prefill and one decode "
            f"step against eager, from benchmarks/results/coverage_fx.json): "
            f"{len(fx_results)} of the {len(results)} architectures run; {fx_counts['pass']} of {fx_buildable} "
            f"buildable ones pass "
            f"({', '.join(f'{status} {count}' for status, count in sorted(fx_counts.items()))}).",
            "",
        ]
    lines += ["## Not passing, by reason", ""]
    for (status, reason), model_types in sorted(failure_groups(results).items()):
        lines.append(f"- {status}: {reason}: {', '.join(sorted(model_types))}")
    lines += ["", "## Every architecture", ""]
    header = ["model type", "class", "route", "outcome", "note"] + (["FX sweep", "FX note"] if fx_results else [])
    rows = []
    for model_type, result in sorted(results.items()):
        route = result.get("route", "-") + (f" ({result['fx_compiler']})" if result.get("fx_compiler") else "")
        row = [model_type, result.get("class", ""), route, result["status"], _note(result)]
        if fx_results:
            fx_result = fx_results.get(model_type, {})
            row += [fx_result.get("status", "-"), _note(fx_result)]
        rows.append(row)
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


ROUTE_NAMES = {"hf": "Hugging Face route", "fx": "FX route (models the Hugging Face route cannot serve)",
               "-": "no result to say which"}


def _fx_results(fx: Optional[dict]) -> dict:
    """model type -> result of the FX route's sweep (its JSON keeps them under "models")."""
    if not fx:
        return {}
    return fx.get("results") or fx.get("models") or {}


def failure_groups(results: dict) -> dict:
    """(status, reason) -> model types, for every architecture that did not pass (the class
    name taken out of the reason so that one cause groups its models)."""
    groups: dict = {}
    for model_type, result in results.items():
        if result["status"] == "pass":
            continue
        reason = str(result.get("reason", "")).replace(result.get("class", "") or "\0", "<model>")
        groups.setdefault((result["status"], reason.split(" (")[0][:140]), []).append(model_type)
    return groups


def _note(result: dict) -> str:
    if result.get("status") == "pass":
        dense = result.get("dense_reasons") or []
        return ("some layers dense: " + "; ".join(dense)) if dense else ""
    return str(result.get("reason") or result.get("error") or "")[:160]


if __name__ == "__main__":
    sys.exit(main())
