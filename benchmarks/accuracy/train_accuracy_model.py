#!/usr/bin/env python3
"""Train the project's long-context accuracy model on the synthetic retrieval tasks.

Reproducible up to the wall-clock budget: data, initialisation and the curriculum's
random draws come from --seed; the number of steps is what fits in --time-budget
seconds (the learning-rate schedule follows elapsed time), so it depends on the machine.

    python benchmarks/accuracy/train_accuracy_model.py --time-budget 270 --out-dir out/acc

What it does:
  * mixes the three tasks of gsa_compile.accuracy.tasks uniformly, each training sequence
    asking 1..8 questions (kv), 1..4 (needle) or 1 (passkey);
  * curriculum of context lengths min-len, 2*min-len, ..., max-len; a constant number of
    tokens per batch; a stage advances once the running answer-token accuracy at its
    length reaches --advance-acc, or at the latest when its share of the time budget is
    spent (the last stage is reached by --reach-max-at of the budget); --mix-shorter of
    the batches use a shorter length already learnt;
  * positional stretching (PoSE-like): in --pose-prob of the max-length batches the
    position ids jump by a random offset at a random point, so the model sees relative
    distances up to --pose-max;
  * loss: cross-entropy on the answer tokens (the head runs only on those positions),
    plus --lm-weight times the next-token loss on every other position;
  * bf16 autocast on CUDA, fp32 master weights, AdamW, warm-up then cosine decay;
  * stops training on the wall-clock budget, writes config.json + model.safetensors
    (bf16) to --out-dir, reloads them and measures held-out dense greedy accuracy per task
    at --eval-lens (default 1K/4K/8K/16K) into results.json; --install also copies the
    weights into gsa_compile/assets/accuracy_model/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gsa_compile.accuracy import model as acc_model  # noqa: E402
from gsa_compile.accuracy import tasks as T  # noqa: E402

MAX_QUERIES = {"passkey": 1, "kv": 8, "needle": 4}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--install", action="store_true", help="copy the weights into the package assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=270.0, help="training wall-clock seconds")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: no limit)")
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--decay-start", type=float, default=0.6, help="fraction of the budget where cosine decay starts")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--advance-acc", type=float, default=0.9)
    p.add_argument("--min-stage-steps", type=int, default=30)
    p.add_argument("--reach-max-at", type=float, default=0.45)
    p.add_argument("--mix-shorter", type=float, default=0.25)
    p.add_argument("--pose-prob", type=float, default=0.3)
    p.add_argument("--pose-max", type=int, default=16384)
    p.add_argument("--lm-weight", type=float, default=0.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-lens", type=str, default="1024,4096,8192,16384")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-batch", type=int, default=25)
    p.add_argument("--eval-attn", type=str, default="sdpa")
    p.add_argument("--model", type=str, default="", help="config overrides, e.g. 'num_hidden_layers=2,hidden_size=64'")
    return p.parse_args(argv)


def parse_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        out[k.strip()] = float(v) if "." in v or "e" in v else int(v)
    return out


def make_batch(rng: np.random.Generator, length: int, batch: int):
    ids = np.empty((batch, length), dtype=np.int64)
    mask = np.empty((batch, length), dtype=bool)
    for b in range(batch):
        task = T.TASKS[int(rng.integers(len(T.TASKS)))]
        nq = int(rng.integers(1, MAX_QUERIES[task] + 1))
        ids[b], mask[b], _ = T.make_sequence(task, length, rng, n_queries=nq)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def stretched_positions(rng: np.random.Generator, batch: int, length: int, pose_max: int) -> torch.Tensor:
    """Position ids 0..length-1 with one jump of a random offset at a random split, so
    that relative distances up to ``pose_max`` appear."""
    pos = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    for b in range(batch):
        split = int(rng.integers(1, length))
        offset = int(rng.integers(0, pose_max - length + 1))
        pos[b, split:] += offset
    return torch.from_numpy(pos)


def lr_at(args, step: int, frac: float) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if frac <= args.decay_start:
        decay = 1.0
    else:
        x = min(1.0, (frac - args.decay_start) / max(1e-9, 1.0 - args.decay_start))
        decay = args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * x))
    return args.lr * warm * decay


def train(args, model, device) -> dict:
    rng = np.random.default_rng([args.seed, 7])
    lengths = []
    L = args.min_len
    while L < args.max_len:
        lengths.append(L)
        L *= 2
    lengths.append(args.max_len)
    n_stages = len(lengths)
    # latest time fraction at which stage s starts
    deadline = [args.reach_max_at * s / max(1, n_stages - 1) for s in range(n_stages)]
    log(f"curriculum {lengths}, stage deadlines (fraction of budget) {[round(d, 3) for d in deadline]}")

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused,
    )
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    model.train()
    stage, stage_steps, ema = 0, 0, 0.0
    step, tokens, answer_tokens = 0, 0, 0
    history = []
    t0 = time.time()
    last_log_t, last_log_tokens = t0, 0
    while True:
        elapsed = time.time() - t0
        frac = elapsed / args.time_budget
        if elapsed >= args.time_budget or (args.max_steps and step >= args.max_steps):
            break
        # curriculum: advance on accuracy, or when the stage's deadline has passed
        while stage + 1 < n_stages and (
            (ema >= args.advance_acc and stage_steps >= args.min_stage_steps) or frac >= deadline[stage + 1]
        ):
            why = "accuracy" if ema >= args.advance_acc and stage_steps >= args.min_stage_steps else "deadline"
            stage += 1
            stage_steps, ema = 0, 0.0
            log(f"step {step}: stage {stage} -> length {lengths[stage]} ({why}, t={elapsed:.0f}s)")
            history.append({"step": step, "time_s": round(elapsed, 1), "stage": stage, "length": lengths[stage], "why": why})
        at_stage = not (stage > 0 and rng.random() < args.mix_shorter)
        length = lengths[stage] if at_stage else lengths[int(rng.integers(0, stage))]
        batch = max(1, args.tokens_per_batch // length)
        ids, mask = make_batch(rng, length, batch)
        pos = None
        if at_stage and stage == n_stages - 1 and args.pose_max > length and rng.random() < args.pose_prob:
            pos = stretched_positions(rng, batch, length, args.pose_max).to(device, non_blocking=True)
        ids = ids.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)

        lr = lr_at(args, step, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        with amp:
            hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            tmask = mask[:, 1:]  # target t+1 predicted at t
            h_ans = hidden[:, :-1][tmask]
            logits = model.lm_head(h_ans).float()
            targets = ids[:, 1:][tmask]
            loss = F.cross_entropy(logits, targets)
            if args.lm_weight > 0:
                h_rest = hidden[:, :-1][~tmask]
                lm = F.cross_entropy(model.lm_head(h_rest).float(), ids[:, 1:][~tmask])
                loss = loss + args.lm_weight * lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        step += 1
        stage_steps += 1
        tokens += ids.numel()
        answer_tokens += int(targets.numel())
        if at_stage or step % args.log_every == 0:
            acc = (logits.argmax(-1) == targets).float().mean().item()
            if at_stage:
                ema = acc if stage_steps <= 1 else 0.9 * ema + 0.1 * acc
        if step % args.log_every == 0:
            now = time.time()
            tps = (tokens - last_log_tokens) / max(1e-9, now - last_log_t)
            last_log_t, last_log_tokens = now, tokens
            log(
                f"step {step} t={now - t0:.0f}s len={length} bs={batch} loss={loss.item():.4f} "
                f"acc={acc:.3f} ema@{lengths[stage]}={ema:.3f} lr={lr:.2e} gnorm={gnorm.item():.2f} tok/s={tps:,.0f}"
            )
    train_time = time.time() - t0
    log(f"training done: {step} steps, {tokens:,} tokens, {train_time:.0f}s, final stage length {lengths[stage]}, ema {ema:.3f}")
    model.eval()
    return {
        "steps": step,
        "tokens": tokens,
        "answer_tokens": answer_tokens,
        "train_time_s": round(train_time, 1),
        "tokens_per_s": round(tokens / max(1e-9, train_time)),
        "final_stage_length": lengths[stage],
        "final_train_answer_token_acc_ema": round(ema, 4),
        "curriculum": lengths,
        "stage_changes": history,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = parse_overrides(args.model)
    model = acc_model.build_accuracy_model(seed=args.seed, attn_implementation="sdpa", **overrides).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}), "
        f"torch {torch.__version__}, params {n_params:,}, overrides {overrides}")

    stats = train(args, model, device)

    acc_model.save_accuracy_model(model, args.out_dir)
    size = (args.out_dir / "model.safetensors").stat().st_size
    log(f"saved {args.out_dir} (model.safetensors {size / 2**20:.2f} MiB)")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # held-out dense accuracy of the weights exactly as saved (bf16 on disk, run in fp32)
    t1 = time.time()
    m = acc_model.load_accuracy_model(args.out_dir, attn_implementation=args.eval_attn, device=device)
    lens = [int(x) for x in args.eval_lens.split(",") if x]
    table: dict = {}
    for task in T.TASKS:
        for L in lens:
            ts = time.time()
            samples = T.make_samples(task, L, args.eval_n, seed=args.eval_seed)
            acc = T.answer_accuracy(m, samples, batch_size=args.eval_batch)
            table.setdefault(task, {})[str(L)] = acc
            log(f"eval {task:8s} @ {L:6d}: {acc:.3f} (n={args.eval_n}, {time.time() - ts:.1f}s)")
    eval_time = time.time() - t1
    results = {
        "dense_accuracy": table,
        "eval": {"n_per_cell": args.eval_n, "seed": args.eval_seed, "attn_implementation": args.eval_attn,
                 "dtype": "float32 (weights stored bf16)", "device": str(device), "time_s": round(eval_time, 1)},
        "training": stats,
        "model": {"params": n_params, "safetensors_bytes": size, "config": json.loads((args.out_dir / "config.json").read_text())},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
    }
    import transformers

    results["env"]["transformers"] = transformers.__version__
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    log("summary (dense greedy exact match):")
    print("task      " + "".join(f"{L:>8d}" for L in lens))
    for task in T.TASKS:
        print(f"{task:10s}" + "".join(f"{table[task][str(L)]:8.3f}" for L in lens))
    if args.install:
        acc_model.ASSET_DIR.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "model.safetensors", "results.json"):
            shutil.copy2(args.out_dir / f, acc_model.ASSET_DIR / f)
        log(f"installed into {acc_model.ASSET_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
