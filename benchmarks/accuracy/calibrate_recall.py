#!/usr/bin/env python3
"""Calibrate hash weights on an accuracy model with the norm-scaled sharpness, and report
per layer what they buy: attention-mass recall of trained vs random codes at equal bits.

    python benchmarks/accuracy/calibrate_recall.py --model build/geometry128 --out build/g128_hashes \\
        --context-len 8192 --samples 2 --temperature 1 --device cuda

Steps (docs/accuracy.md, "The head-dim-128 model"):
  1. calibration sequences (--tasks x --samples of --context-len tokens, --seed; keep it off
     the evaluation seed 1234 and the recall seed) are captured and HATA trains every layer
     and KV head (gsa_compile.calibrate), with sigma derived per step from the q/k norms
     (--temperature, gsa_compile/calibration/scale.py) or fixed (--temperature 0 --sigma S);
     the layer profile (blocks for 90% of the mass, overlaps) comes with it;
  2. held-out sequences (--recall-seed) are captured and, at their last --decode-queries
     positions, the blocks each selector picks at --budget are scored by the share of the true
     attention mass they hold (gsa_compile/calibration/recall.py): GSA with the random weights
     training started from, GSA with the trained weights (same bits), the exact top-k ceiling;
  3. writes OUT/gsa_config.json + hash_weights.safetensors (for --hash-config of
     eval_accuracy.py), OUT/calibration_report.json (norm statistics, profile, recall, losses)
     and OUT/recall.png; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gsa_compile.accuracy.model import load_accuracy_model  # noqa: E402
from gsa_compile.accuracy.tasks import make_samples  # noqa: E402
from gsa_compile.calibration import HataSettings, calibrate, capture_layers  # noqa: E402
from gsa_compile.calibration.recall import mass_recall, recall_table  # noqa: E402
from gsa_compile.calibration.scale import norm_statistics  # noqa: E402
from gsa_compile.config import GSAConfig  # noqa: E402
from gsa_compile.tables import format_table, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="accuracy model folder (default: the committed model)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", default="passkey,kv,needle")
    p.add_argument("--context-len", type=int, default=8192)
    p.add_argument("--samples", type=int, default=2, help="calibration sequences per task")
    p.add_argument("--seed", type=int, default=1235)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="rms of the relaxed sign's argument; sigma = T sqrt(D) / rms|x| per step (0: fixed --sigma)")
    p.add_argument("--sigma", type=float, default=0.1, help="fixed sharpness when --temperature is 0 (HATA: 0.1)")
    p.add_argument("--top-fraction", type=float, default=0.1, help="share of each query's keys labelled positive")
    p.add_argument("--eps", type=float, default=HataSettings.eps, help="weight of the similarity term")
    p.add_argument("--eta", type=float, default=HataSettings.eta, help="weight of the bit-balance term")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--must-select", default="0,-1")
    p.add_argument("--budget", type=float, default=0.0156, help="recall budget, a share of the cache")
    p.add_argument("--ratio", type=float, default=0.1, help="profile: budget ratio of sparse layers")
    p.add_argument("--recall-len", type=int, default=0, help="held-out sequence length (default --context-len)")
    p.add_argument("--recall-samples", type=int, default=1, help="held-out sequences per task")
    p.add_argument("--recall-seed", type=int, default=999)
    p.add_argument("--decode-queries", type=int, default=8)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def samples_of(tasks: str, length: int, per_task: int, seed: int) -> list:
    return [s for task in tasks.split(",") if task for s in make_samples(task, length, per_task, seed)]


def plot_recall(recall: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(next(iter(recall.values())))
    width = 0.8 / len(recall)
    figure, axis = plt.subplots(figsize=(max(5.0, 0.6 * len(layers) + 2), 3.6))
    for i, (name, by_layer) in enumerate(recall.items()):
        axis.bar([layer + (i - (len(recall) - 1) / 2) * width for layer in layers], [by_layer[l] for l in layers],
                 width, label=name)
    axis.set_xticks(layers)
    axis.set_xlabel("layer")
    axis.set_ylabel("attention mass inside the selection")
    axis.set_title(title, fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    must = [int(x) for x in args.must_select.split(",") if x]
    model = load_accuracy_model(args.model, device=args.device)
    config = GSAConfig.for_model(model, chunk_size=args.chunk_size, must_select_blocks=must,
                                 model_name=str(args.model or "gsa-compile/accuracy-model"))
    settings = HataSettings(sigma=args.sigma, temperature=args.temperature or None, top_fraction=args.top_fraction,
                            eps=args.eps, eta=args.eta)
    result = calibrate(
        model, samples_of(args.tasks, args.context_len, args.samples, args.seed), config,
        epochs=args.epochs, iterations=args.iterations, settings=settings, out_dir=str(args.out),
        profile=True, profile_options={"ratio": args.ratio, "decode_queries": args.decode_queries},
    )
    calibrated = time.perf_counter()
    held_out = capture_layers(model, samples_of(args.tasks, args.recall_len or args.context_len, args.recall_samples, args.recall_seed))
    norms = norm_statistics(held_out, args.temperature or 1.0, paper_sigma=args.sigma)
    recall = mass_recall(held_out, {"random": result.initial_weights, "trained": result.weights},
                         chunk_size=args.chunk_size, budget=args.budget, must_select=must, decode_queries=args.decode_queries)
    losses = {layer: [{"first": heads[0], "last": heads[-1]} for heads in history] for layer, history in result.history.items()}
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "settings": {k: v for k, v in vars(settings).items()},
        "norms": norms,
        "profile": result.profile.to_dict(),
        "recall": {name: {str(layer): value for layer, value in by_layer.items()} for name, by_layer in recall.items()},
        "trained_beats_random_layers": [layer for layer in recall["trained"] if recall["trained"][layer] > recall["random"][layer]],
        "losses": losses,
        "seconds": {"calibration": calibrated - started, "recall": time.perf_counter() - calibrated},
        "environment": {"torch": torch.__version__, "device": args.device},
    }
    write_json(str(args.out / "calibration_report.json"), report)
    plot_recall(recall, args.out / "recall.png",
                f"held-out {args.recall_len or args.context_len} tokens, budget {args.budget:.2%}, chunk {args.chunk_size}")

    rows = [["layer", "rms |q|", "rms |k|", "sigma_q", "sigma_k", f"T at sigma {args.sigma:g} (q/k)"]]
    for layer in sorted({row["layer"] for row in norms}):
        heads = [row for row in norms if row["layer"] == layer]
        mean = {key: sum(row[key] for row in heads) / len(heads) for key in heads[0] if key not in ("layer", "kv_head")}
        rows.append([str(layer), f"{mean['query_rms_norm']:.1f}", f"{mean['key_rms_norm']:.1f}", f"{mean['sigma_q']:.3f}",
                     f"{mean['sigma_k']:.3f}", f"{mean['paper_temperature_q']:.2f}/{mean['paper_temperature_k']:.2f}"])
    print("q/k norms on the held-out sequences (mean over KV heads):")
    print(format_table(rows))
    print("layer profile (calibration sequences):")
    print(result.profile.table())
    print(f"attention-mass recall at {args.budget:.2%} (held-out, last {args.decode_queries} positions):")
    print(recall_table(recall))
    print(f"trained > random in {len(report['trained_beats_random_layers'])} of {len(recall['trained'])} layers; "
          f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
