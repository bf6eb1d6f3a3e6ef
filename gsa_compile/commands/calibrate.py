"""`gsa-compile calibrate`: train HATA hash weights (and optionally profile the layer policy)
on synthetic long-context sequences; writes a "fixed" config that gsa_compile.optimize loads."""

from __future__ import annotations

DEFAULT_TASKS = "passkey,kv,needle"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="train HATA hash weights per layer and KV head; optionally profile the layer policy",
    )
    parser.add_argument("--model", default=None,
                        help="a LlamaForCausalLM folder (default: the committed accuracy model) whose vocabulary "
                             "holds the accuracy tasks' 512 token ids")
    parser.add_argument("--out", required=True, help="folder for gsa_config.json and hash_weights.safetensors")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"calibration tasks (default {DEFAULT_TASKS})")
    parser.add_argument("--context-len", type=int, default=4096, help="tokens per calibration sequence")
    parser.add_argument("--samples", type=int, default=2, help="calibration sequences per task")
    parser.add_argument("--seed", type=int, default=7, help="seed of the calibration sequences (keep it off the eval seed)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per layer and KV head (default 15)")
    parser.add_argument("--iterations", type=int, default=20, help="optimizer steps per epoch (default 20)")
    parser.add_argument("--sigma", type=float, default=0.1, help="relaxed-sign sharpness (HATA: 0.1)")
    parser.add_argument("--chunk-size", type=int, default=128, help="block size of the written config")
    parser.add_argument("--must-select", default="0,-2,-1", help="must-select blocks of the written config")
    parser.add_argument("--profile-layers", action="store_true",
                        help="also measure per-layer sparsity and overlap and set dense layers and index reuse")
    parser.add_argument("--ratio", type=float, default=0.3, help="budget ratio of sparse layers (with --profile-layers)")
    parser.add_argument("--reuse-above", type=float, default=0.8,
                        help="Jaccard overlap above which a layer reuses an earlier layer's selection")
    parser.add_argument("--dense-layers", type=int, default=None,
                        help="make exactly this many least-sparse layers dense (default: those needing more "
                             "blocks than --ratio for 90%% of their attention)")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on (cpu, cuda)")
    parser.set_defaults(handler=run)


def parse_ints(text: str, what: str) -> list[int]:
    from ..errors import GSAConfigError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise GSAConfigError(f"{what} must be comma-separated integers, got {text!r}") from exc


def calibration_samples(tasks: str, context_len: int, per_task: int, seed: int) -> list:
    from ..accuracy.tasks import make_samples

    return [sample for task in tasks.split(",") if task for sample in make_samples(task, context_len, per_task, seed)]


def run(args) -> int:
    from ..accuracy.model import load_accuracy_model
    from ..calibration import HataSettings, calibrate
    from ..config import GSAConfig

    model = load_accuracy_model(args.model, device=args.device)
    config = GSAConfig.for_model(
        model, chunk_size=args.chunk_size, must_select_blocks=parse_ints(args.must_select, "--must-select"),
        model_name=str(args.model or "gsa-compile/accuracy-model"),
    )
    result = calibrate(
        model, calibration_samples(args.tasks, args.context_len, args.samples, args.seed), config,
        epochs=args.epochs, iterations=args.iterations, settings=HataSettings(sigma=args.sigma),
        out_dir=args.out, profile=args.profile_layers,
        profile_options={"ratio": args.ratio, "reuse_above": args.reuse_above, "dense_layers": args.dense_layers},
    )
    if result.profile is not None:
        print(result.profile.table())
    for layer, heads in result.history.items():
        first = sum(h[0]["loss"] for h in heads) / len(heads)
        last = sum(h[-1]["loss"] for h in heads) / len(heads)
        print(f"layer {layer}: HATA loss {first:.4f} -> {last:.4f} (mean over {len(heads)} KV heads)")
    print(f"wrote {result.config_path}")
    return 0
