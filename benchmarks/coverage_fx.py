"""Coverage of the FX route: every causal LM of the installed transformers, compiled with
torch.compile(model, backend="gsa") and its default compiler (Inductor), against eager.

    python benchmarks/coverage_fx.py                       # the whole sweep (long on a small CPU)
    python benchmarks/coverage_fx.py --sample 8            # a seeded sample of 8 architectures
    python benchmarks/coverage_fx.py --models llama gpt2   # named architectures
    python benchmarks/coverage_fx.py --retry-failed        # re-run what did not pass, keep the rest
    python benchmarks/coverage_fx.py --resume --workers 8  # finish an interrupted sweep, 8 at a time
    python benchmarks/coverage_fx.py --table-only          # rewrite the table from the JSON

Each architecture of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES is built from a tiny config (hidden 64,
2 layers (4 where a hybrid pattern has no attention layer in 2), 4 query / 2 KV heads of dim
16, vocab 128, random weights; no download). The GSA config is sized from the captured graph
(GSAConfig.for_model(model, ids)) at full budget: every site sparse at ratio 0.999, thresholds
0, chunk 16, no must-select blocks, so the rewritten model must give eager's logits to
rounding, at prefill (16 tokens) and at one decode step on the cache. Every architecture runs in
its own forked process with a timeout. Results are written after each architecture to the JSON
(--out) and a markdown table (--table): status, sites, max |logit difference|, the error, and
where the compile time went (Inductor, the GSA passes). Statuses: pass (sites rewritten, logits
equal to eager), dense (no site provable, each candidate's reason reported, logits equal to
eager), no_attention (no softmax of a product in the graph), mismatch, error, timeout, and
unbuildable (the tiny config does not build or fails in eager: not counted)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import sys
import time
import traceback
import warnings

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # forked workers: no compile pool per model

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gsa_compile.tables import format_table, write_json  # noqa: E402

DEFAULT_JSON = os.path.join(HERE, "results", "coverage_fx.json")
DEFAULT_TABLE = os.path.join(ROOT, "docs", "coverage_fx.md")

# The tiny sizes; each is set only where the architecture's config has the field (aliases such
# as GPT-2's n_embd resolve through the config's attribute_map).
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, vocab_size=128, max_position_embeddings=256,
    rotary_dim=8,  # partial rotary (GPT-J, CodeGen): within the head dim
    # mixture of experts: few, small experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_group=1, topk_group=1,
    # MLA
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    # encoder-decoder heads used as decoders
    d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, num_encoder_layers=2, num_decoder_layers=2,
)
# Special tokens must lie inside the tiny vocabulary (an embedding's padding_idx is checked).
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# What an architecture's config validation insists on, beyond the tiny sizes.
REQUIRED = {"zaya": dict(num_experts_per_tok=1), "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
            "xlnet": dict(n_head=4, d_head=16)}
HYBRID_LAYERS = 4
PROMPT = 16
ATOL, RTOL = 2e-4, 2e-4
FULL_BUDGET = dict(chunk_size=16, must_select_blocks=[], cpu_seq_len_threshold=0, cpu_concurrency_threshold=0,
                   budget_tokens=None)


def architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, layers: int = TINY["num_hidden_layers"]):
    """The architecture's default config with the tiny sizes it has fields for."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text = default.get_text_config() if hasattr(default, "get_text_config") else default
    sizes = {name: size for name, size in TINY.items() if hasattr(text, name)}
    sizes.update({name: token for name, token in TOKENS.items()
                  if isinstance(getattr(text, name, None), int) and getattr(text, name) >= TINY["vocab_size"]})
    sizes.update(REQUIRED.get(model_type, {}))
    if "qk_rope_head_dim" in sizes and "head_dim" in sizes:
        sizes["head_dim"] = sizes["qk_rope_head_dim"]  # MLA: head_dim is the rotary part (DeepSeek-V3's config)
    for name in ("num_hidden_layers", "encoder_layers", "decoder_layers", "num_encoder_layers", "num_decoder_layers"):
        if name in sizes:
            sizes[name] = layers
    if text is default:
        return _config_without_refused(model_type, sizes)
    # Composite configs (a text config inside): size the text part.
    text_type = getattr(text, "model_type", None)
    sized_text = AutoConfig.for_model(text_type, **sizes) if text_type else text
    for name in ("text_config", "decoder", "language_config"):
        if getattr(default, name, None) is text:
            return AutoConfig.for_model(model_type, **{name: sized_text.to_dict()})
    return default


def _config_without_refused(model_type: str, sizes: dict):
    """AutoConfig.for_model with the sizes, leaving out each one the config refuses to be set
    (a derived property such as Falcon's head_dim, ProphetNet's depth, XLNet's length limit)."""
    from transformers import AutoConfig

    sizes = dict(sizes)
    while True:
        try:
            return AutoConfig.for_model(model_type, **sizes)
        except (AttributeError, NotImplementedError) as exc:
            # The size the message names, else the first one without which this refusal goes.
            refused = [name for name in sizes if name in str(exc)] or [
                name for name in sizes if _refusal(model_type, {k: v for k, v in sizes.items() if k != name}) != str(exc)]
            if not refused:
                raise
            sizes.pop(refused[0])


def _refusal(model_type: str, sizes: dict) -> str:
    """The message of the refusal the config gives these sizes, '' when it takes them."""
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(model_type, **sizes)
    except Exception as exc:  # any refusal: only whether it is the same one matters
        return str(exc)
    return ""


def _has_attention_layer(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if not types:
        return True
    return any("attention" in str(kind) and "linear" not in str(kind) or "full" in str(kind) or "sliding" in str(kind)
               for kind in types)


def build(model_type: str):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    if not _has_attention_layer(config):
        config = tiny_config(model_type, layers=HYBRID_LAYERS)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _compile_seconds() -> dict:
    """Where the torch.compile time of prefill and decode went: dynamo's tracing, the gsa
    backend (GSA passes and the compiler it hands on to) and Inductor's share of it."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    spent = {name: round(sum(metrics.get(key, ())), 1) for name, key in (
        ("dynamo", "bytecode_tracing"), ("backend", "OutputGraph.call_user_compiler"),
        ("inductor", "create_aot_dispatcher_function"))}
    spent["gsa_passes"] = round(spent["backend"] - spent["inductor"], 1)
    return spent


def _logits(output):
    return output.logits if hasattr(output, "logits") else output[0]


def _cache(output):
    return getattr(output, "past_key_values", None)


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _close(a, b) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=ATOL, rtol=RTOL))


def run_one(model_type: str, compiler: str = "inductor") -> dict:
    """Build, run eager, size the config from the graph, compile with the gsa backend, compare."""
    import gsa_compile

    result = {"model": model_type, "status": "", "stage": "", "sites": None, "sparse_sites": None,
              "unmatched": [], "prefill_diff": None, "decode_diff": None, "error": "", "seconds": 0.0}
    start = time.time()
    stage = "build"
    try:
        model = build(model_type)
        result["architecture"] = type(model).__name__
        vocab = model.get_input_embeddings().weight.shape[0] if model.get_input_embeddings() is not None else 128
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, min(vocab, 128), (1, PROMPT), generator=generator)
        stage = "eager"
        with torch.no_grad():
            prefill = model(ids, use_cache=True)
            following = _logits(prefill)[:, -1:].argmax(-1)
            cache = _cache(prefill)
            step_inputs = (following, cache) if cache is not None else (torch.cat([ids, following], 1), None)
            step = model(step_inputs[0], past_key_values=step_inputs[1], use_cache=cache is not None)
        result["decode"] = "cache" if cache is not None else "no cache: the longer prompt again"
        stage = "size"
        try:
            config = gsa_compile.GSAConfig.for_model(model, ids, use_cache=True)
            config = config.replace(top_k_ratio_per_layer=[0.999] * config.num_hidden_layers, **FULL_BUDGET)
        except gsa_compile.GSAConfigError as exc:
            if "no attention site" not in str(exc):
                raise
            # Nothing to rewrite: the compiled model must still be eager's, every candidate reported.
            config = None
        stage = "compile"
        torch._dynamo.reset()
        torch._dynamo.utils.compilation_time_metrics.clear()
        reports = []
        compiled = torch.compile(model, backend="gsa", options={"config": config, "compiler": compiler,
                                                                 "reports": reports})
        with torch.no_grad():
            stage = "prefill"
            got = compiled(ids, use_cache=True)
            result["prefill_diff"] = _max_diff(_logits(got), _logits(prefill))
            got_cache = _cache(got)
            stage = "decode"
            got_step = compiled(following if got_cache is not None else step_inputs[0], past_key_values=got_cache,
                                use_cache=got_cache is not None)
            result["decode_diff"] = _max_diff(_logits(got_step), _logits(step))
        sites = {(site.layer, site.module_path): site.policy for report in reports for site in report.sites}
        result["sites"] = len(sites)
        result["sparse_sites"] = sum(policy != "dense" for policy in sites.values())
        result["unmatched"] = sorted({f"{item.location}: {item.reason}" for report in reports
                                      for item in report.unmatched})
        result["compile_seconds"] = _compile_seconds()
        stage = "compare"
        equal = _close(_logits(got), _logits(prefill)) and _close(_logits(got_step), _logits(step))
        if equal and not result["sites"]:
            result["status"] = "dense" if result["unmatched"] else "no_attention"
            result["error"] = "no attention site; left dense: " + "; ".join(result["unmatched"]) \
                if result["unmatched"] else "no softmax of a product in the graph (recurrent / state-space model)"
        elif equal:
            result["status"] = "pass"
        else:
            result["status"] = "mismatch"
            result["error"] = f"logits differ from eager: prefill {result['prefill_diff']:.3g}, decode " \
                              f"{result['decode_diff']:.3g}"
    except Exception as exc:  # every failure is a result of the sweep, with its stage
        result["status"] = "unbuildable" if stage in ("build", "eager") else "error"
        result["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        result["traceback"] = traceback.format_exc()[-3000:]
    result["stage"] = stage
    result["seconds"] = round(time.time() - start, 1)
    return result


def _worker(model_type, compiler, queue):
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    queue.put(run_one(model_type, compiler))


def run_isolated(model_type: str, compiler: str, timeout: float) -> dict:
    """run_one in a forked process (a crash or hang costs one architecture, not the sweep)."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(model_type, compiler, queue))
    start = time.time()
    process.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:
        return {"model": model_type, "status": "timeout" if process.is_alive() else "error", "stage": "",
                "error": f"no result within {timeout:.0f} s" if process.is_alive()
                else f"worker died (exit code {process.exitcode})", "seconds": round(time.time() - start, 1)}
    finally:
        if process.is_alive():
            process.kill()
        process.join()


# ---------------------------------------------------------------------- the table
# Buildable architectures. "dense": no site rewritten, every candidate left dense with its reason
# in the report, the compiled model equal to eager; "no_attention": the graph has no softmax of
# a product at all (recurrent and state-space models), nothing for GSA to do.
COUNTED = ("pass", "dense", "no_attention", "mismatch", "error", "timeout")


def failure_group(result: dict) -> str:
    """The error with numbers and names generalised, so alike failures group together."""
    if result["status"] == "timeout":
        return "timeout"
    if result["status"] == "mismatch":
        return "logits differ from eager"
    if result["status"] == "dense":
        return "equal to eager, left dense: no candidate provable (reasons in the table below)"
    text = " ".join((result.get("error") or "").split())
    text = re.sub(r"\d+", "N", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    return f"{result.get('stage', '')}: {text[:120]}"


def summary(results: dict) -> dict:
    counted = [r for r in results.values() if r["status"] in COUNTED]
    passed = [r for r in counted if r["status"] == "pass"]
    groups: dict = {}
    for result in counted:
        if result["status"] not in ("pass", "no_attention"):
            groups.setdefault(failure_group(result), []).append(result["model"])
    return {
        "architectures": len(results),
        "buildable": len(counted),
        "passed": len(passed),
        "dense": sum(r["status"] == "dense" for r in counted),
        "no_attention": sum(r["status"] == "no_attention" for r in counted),
        "unbuildable": sum(r["status"] == "unbuildable" for r in results.values()),
        "failure_groups": dict(sorted(groups.items(), key=lambda item: -len(item[1]))),
    }


def markdown(payload: dict) -> str:
    results, meta = payload["models"], payload["meta"]
    totals = summary(results)
    lines = [
        f"# FX route coverage (torch.compile backend \"gsa\", {meta['compiler']})",
        "",
        f"Every causal LM of transformers {meta['transformers']} (torch {meta['torch']}) built from a tiny config "
        f"with random weights, compiled with `torch.compile(model, backend=\"gsa\", options={{\"config\": ...}})` "
        f"(compiler {meta['compiler']}), the config sized from the graph (`GSAConfig.for_model(model, ids)`) "
        f"at full budget; logits compared with eager at prefill ({PROMPT} tokens) and one decode step "
        f"(atol {ATOL}, rtol {RTOL}). Written by `python benchmarks/coverage_fx.py` "
        f"({meta.get('command', '')}).",
        "",
        f"**{totals['passed']} of {totals['buildable']} buildable architectures pass** "
        f"({totals['architectures']} of the {meta.get('total', '?')} architectures run, {totals['unbuildable']} of "
        f"them not buildable from a tiny config or failing in eager). Of the others, {totals['dense']} compile "
        f"equal to eager with every attention left dense for a reason the report states (`dense`), and "
        f"{totals['no_attention']} have no attention to rewrite (`no_attention`: recurrent and state-space "
        f"models); a pass has every site it rewrote equal to eager.",
        "",
        "## Failure groups",
        "",
    ]
    rows = [("architectures", "failure", "examples")]
    for group, models in totals["failure_groups"].items():
        rows.append((len(models), group.replace("|", "/"), ", ".join(models[:6]) + (" …" if len(models) > 6 else "")))
    lines += _markdown_table(rows) + ["", "## Per architecture", ""]
    rows = [("model", "status", "sites (sparse)", "prefill diff", "decode diff", "seconds (Inductor, GSA passes)",
             "error or unmatched")]
    for name in sorted(results):
        r = results[name]
        note = r.get("error") or "; ".join(r.get("unmatched") or [])
        sites = "" if r.get("sites") is None else f"{r['sites']} ({r.get('sparse_sites')})"
        spent = r.get("compile_seconds")
        seconds = f"{r.get('seconds', '')}" + (f" ({spent['inductor']}, {spent['gsa_passes']})" if spent else "")
        rows.append((name, r["status"], sites, _fmt(r.get("prefill_diff")), _fmt(r.get("decode_diff")), seconds,
                     " ".join(note.split())[:160].replace("|", "/")))
    lines += _markdown_table(rows)
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "" if x is None else f"{x:.1e}"


def _markdown_table(rows) -> list[str]:
    head, *body = rows
    out = ["| " + " | ".join(str(c) for c in head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return out


def write(payload: dict, json_path: str, table_path: str) -> None:
    payload["summary"] = summary(payload["models"])
    write_json(json_path, payload)
    if table_path:
        os.makedirs(os.path.dirname(os.path.abspath(table_path)), exist_ok=True)
        with open(table_path, "w") as handle:
            handle.write(markdown(payload))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="architectures (model_type) to run; default: all")
    parser.add_argument("--sample", type=int, help="a seeded random sample of this many architectures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per architecture")
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--out", default=DEFAULT_JSON, help="JSON results (updated after each architecture)")
    parser.add_argument("--table", default=DEFAULT_TABLE, help="markdown table ('' for none)")
    parser.add_argument("--retry-failed", action="store_true", help="keep passed results of --out, re-run the rest")
    parser.add_argument("--resume", action="store_true", help="keep every result of --out, run the architectures "
                                                              "it does not have")
    parser.add_argument("--workers", type=int, default=1, help="architectures run at once (one process each)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from --out")
    args = parser.parse_args(argv)
    import transformers

    payload = {"meta": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "compiler": args.compiler, "command": " ".join(sys.argv[1:]) or "all",
                        "total": len(architectures())}, "models": {}}
    if args.table_only or args.retry_failed or args.resume:
        with open(args.out) as handle:
            previous = json.load(handle)
        payload["models"] = previous["models"]
        if args.table_only:
            payload["meta"] = previous["meta"]
            write(payload, args.out, args.table)
            return payload
    names = args.models or architectures()
    if args.sample:
        names = sorted(random.Random(args.seed).sample(names, min(args.sample, len(names))))
    if args.retry_failed:
        names = [n for n in names if payload["models"].get(n, {}).get("status") != "pass"]
    if args.resume:
        names = [n for n in names if n not in payload["models"]]
    # Alike models sit together in the alphabet; a shuffled order makes a partial sweep a fair sample.
    random.Random(args.seed).shuffle(names)
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    progress = tqdm(total=len(names), unit="model", dynamic_ncols=True)
    # Threads only wait on the forked workers; results are written here, one at a time.
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        running = {pool.submit(run_isolated, name, args.compiler, args.timeout): name for name in names}
        for done in as_completed(running):
            payload["models"][running[done]] = done.result()
            write(payload, args.out, args.table)
            totals = payload["summary"]
            progress.set_description(running[done])
            progress.set_postfix(passed=f"{totals['passed']}/{totals['buildable']}")
            progress.update()
    progress.close()
    payload["summary"] = summary(payload["models"])
    totals = payload["summary"]
    rows = [("passed", "dense", "no attention", "buildable", "run", "unbuildable")]
    rows.append((totals["passed"], totals["dense"], totals["no_attention"], totals["buildable"],
                 totals["architectures"], totals["unbuildable"]))
    print(format_table(rows))
    for group, models in totals["failure_groups"].items():
        print(f"{len(models):4d}  {group}  ({', '.join(models[:5])})")
    return payload


if __name__ == "__main__":
    main()
