"""`gsa-compile eval`: the accuracy benchmark (tasks x context lengths x budgets x selection
rules) on the committed accuracy model; prints a table, writes JSON and a PNG plot."""

from __future__ import annotations

import os
import tempfile
import time

from . import deferred_help
from .calibrate import calibration_samples, parse_ints


def _default(name: str) -> str:
    """The benchmark's default budgets or rules, comma-separated."""
    from ..accuracy import evaluate

    return ",".join(str(value) for value in getattr(evaluate, name))


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="accuracy of sparse selection rules vs dense on synthetic long-context tasks")
    parser.add_argument("--model", default=None, help="a LlamaForCausalLM folder (default: the committed accuracy model)")
    parser.add_argument("--tasks", default="passkey,kv,needle", help="comma-separated synthetic tasks (default passkey,kv,needle)")
    parser.add_argument("--lengths", default="2048,4096,8192", help="context lengths in tokens")
    parser.add_argument("--samples", type=int, default=20, help="samples per task and length")
    budgets = parser.add_argument("--budgets", help="budgets as shares of the context (default %(budgets)s)")
    rules = parser.add_argument("--rules", help="selection rules (default, and all there are: %(rules)s)")
    deferred_help(budgets, budgets=lambda: _default("DEFAULT_BUDGETS"))
    deferred_help(rules, rules=lambda: _default("RULES"))
    parser.add_argument("--chunk-size", type=int, default=16, help="block size of the selection (default 16)")
    parser.add_argument("--must-select", default="0,-1", help="comma-separated blocks every selection keeps; negatives count from the end (default 0,-1)")
    parser.add_argument("--dense-layers", default="", help="layers kept dense under every rule, e.g. 0")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the evaluation samples")
    parser.add_argument("--hash-config", default=None,
                        help="gsa_config.json written by gsa-compile calibrate (trained weights); default: calibrate "
                             "here first with the options below")
    parser.add_argument("--calib-samples", type=int, default=2, help="calibration sequences per task (without --hash-config)")
    parser.add_argument("--calib-len", type=int, default=4096, help="calibration sequence length (without --hash-config)")
    parser.add_argument("--sigma", type=float, default=0.1, help="relaxed-sign sharpness of calibration (HATA: 0.1)")
    parser.add_argument("--epochs", type=int, default=15, help="calibration epochs (without --hash-config)")
    parser.add_argument("--iterations", type=int, default=20, help="calibration iterations per epoch (without --hash-config)")
    parser.add_argument("--json", default="accuracy.json", help="where to write the results")
    parser.add_argument("--plot", default=None, help="where to write the PNG plot (default: beside the JSON)")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on (cpu, cuda)")
    parser.set_defaults(handler=run)


def trained_weights(model, args) -> tuple[dict, dict]:
    """layer -> trained hash weight, from --hash-config or a calibration run here."""
    from ..calibration import HataSettings, calibrate
    from ..config import GSAConfig, load_config
    from ..hashing import layer_hash_weight

    if args.hash_config:
        config = load_config(args.hash_config)
        source = {"hash_config": args.hash_config}
    else:
        out = tempfile.mkdtemp(prefix="gsa_calibrate_")
        samples = calibration_samples(args.tasks, args.calib_len, args.calib_samples, seed=args.seed + 1)
        config = calibrate(
            model, samples, GSAConfig.for_model(model), epochs=args.epochs, iterations=args.iterations,
            settings=HataSettings(sigma=args.sigma), out_dir=out,
        ).config
        source = {
            "calibrated_in_this_run": True, "tasks": args.tasks, "context_len": args.calib_len,
            "samples_per_task": args.calib_samples, "seed": args.seed + 1, "sigma": args.sigma,
            "epochs": args.epochs, "iterations": args.iterations,
        }
    module_config = model.config
    kv_heads = int(module_config.num_key_value_heads)
    weights = {layer: layer_hash_weight(config, layer, kv_heads, config.head_dim) for layer in range(config.num_hidden_layers)}
    return weights, source


def run(args) -> int:
    import torch

    from ..accuracy.evaluate import EvalSettings, evaluate, plot, summary_table
    from ..accuracy.model import load_accuracy_model
    from ..tables import write_json

    started = time.perf_counter()
    model = load_accuracy_model(args.model, device=args.device)
    rules = [rule for rule in (args.rules or _default("RULES")).split(",") if rule]
    weights, source = (None, None)
    if "gsa_trained" in rules:
        weights, source = trained_weights(model, args)
    settings = EvalSettings(
        tasks=[task for task in args.tasks.split(",") if task],
        context_lens=parse_ints(args.lengths, "--lengths"),
        n_samples=args.samples,
        budgets=[float(b) for b in (args.budgets or _default("DEFAULT_BUDGETS")).split(",") if b],
        rules=rules,
        chunk_size=args.chunk_size,
        must_select=parse_ints(args.must_select, "--must-select"),
        dense_layers=parse_ints(args.dense_layers, "--dense-layers"),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    results = evaluate(model, settings, trained_weights=weights)
    results["trained_hashes"] = source
    results["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device}
    write_json(args.json, results)
    plot_path = args.plot or os.path.splitext(args.json)[0] + ".png"
    plot(results, plot_path)
    print(summary_table(results))
    total = time.perf_counter() - started
    calibrated = " including calibration" if source and source.get("calibrated_in_this_run") else ""
    print(f"wrote {args.json} and {plot_path} (evaluation {results['seconds']:.0f} s; {total:.0f} s in all{calibrated})")
    return 0
