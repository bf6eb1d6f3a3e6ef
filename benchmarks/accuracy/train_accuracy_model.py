#!/usr/bin/env python3
"""Train the project's long-context accuracy model on the synthetic retrieval tasks.

Reproducible up to the wall-clock budget: data, initialisation and the curriculum's
random draws come from --seed; the number of steps is what fits in --time-budget
seconds (the learning-rate schedule follows elapsed time), so it depends on the machine.

    python benchmarks/accuracy/train_accuracy_model.py --time-budget 280 --out-dir out/acc

(the shipped model's exact command is in benchmarks/accuracy/README.md)

What it does:
  * mixes the three tasks of gsa_compile.accuracy.tasks uniformly, each training sequence
    asking 1..16 questions (kv), 1..8 (needle) or 1 (passkey), as many as fit; rows of
    short stages hold fewer records (at most half the row);
  * curriculum of context lengths min-len (64), 2*min-len, ..., max-len (8192); a constant
    number of tokens per batch; a stage advances once the running answer-token accuracy
    of the WORST task at its length reaches --advance-acc, or when its share of the time
    budget is spent (the last stage is due at --reach-max-at of the budget) provided the
    worst task is at least --deadline-min-acc; --mix-shorter of the batches use a shorter
    length already learnt; batches are generated ahead by --workers processes;
  * positional stretching (PoSE-like): in --pose-prob of the max-length batches the
    position ids jump by a random offset at a random point, so the model sees relative
    distances up to --pose-max;
  * --copy-frac of the rows (in batches up to --copy-max-len) are copy drills (random
    spans repeated at random offsets; the repeats are the targets): dense supervision for the induction
    (match-and-copy) circuit that every task needs, which shortens the initial plateau;
  * loss: cross-entropy on the answer tokens (the head runs only on those positions),
    plus --lm-weight times the next-token loss on every other position;
  * bf16 autocast on CUDA, fp32 master weights, AdamW, warm-up then cosine decay;
  * stops training on the wall-clock budget, writes config.json + model.safetensors
    (bf16) to --out-dir, reloads them and measures held-out dense greedy accuracy per task
    at --eval-lens (default 1K/4K/8K/16K; bf16 on CUDA, fp32 on the CPU) into
    results.json; --install also copies the
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
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    from gsa_compile.accuracy import model as acc_model  # noqa: E402
    from gsa_compile.accuracy import tasks as T  # noqa: E402
except Exception as exc:  # the package's __init__ pulls in the rest of the library;
    # the accuracy tools need none of it, so fall back to a bare package shell
    import types

    print(f"import gsa_compile failed ({exc!r}); loading gsa_compile.accuracy alone", flush=True)
    for name in [n for n in sys.modules if n == "gsa_compile" or n.startswith("gsa_compile.")]:
        del sys.modules[name]
    shell = types.ModuleType("gsa_compile")
    shell.__path__ = [str(ROOT / "gsa_compile")]
    sys.modules["gsa_compile"] = shell
    from gsa_compile.accuracy import model as acc_model  # noqa: E402
    from gsa_compile.accuracy import tasks as T  # noqa: E402

MAX_QUERIES = {"passkey": 1, "kv": 16, "needle": 8}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--install", action="store_true", help="copy the weights into the package assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=270.0, help="training wall-clock seconds")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: no limit)")
    p.add_argument("--min-len", type=int, default=64)
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
    p.add_argument("--deadline-min-acc", type=float, default=0.8,
                   help="a stage's deadline moves on only once its accuracy is at least this "
                        "(a model still on the initial plateau keeps the short length)")
    p.add_argument("--mix-shorter", type=float, default=0.25)
    p.add_argument("--pose-prob", type=float, default=0.3)
    p.add_argument("--pose-max", type=int, default=16384)
    p.add_argument("--lm-weight", type=float, default=0.0)
    p.add_argument("--copy-frac", type=float, default=0.0, help="share of rows that are copy drills")
    p.add_argument("--copy-max-len", type=int, default=1024, help="copy drills only in batches up to this length")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sync-every", type=int, default=5, help="read accuracies back every this many steps")
    p.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)),
                   help="data worker processes (0: generate in the training loop)")
    p.add_argument("--prefetch", type=int, default=6, help="batches requested ahead")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="intra-op CPU threads of the training process (0: torch's default); keep "
                        "threads + workers within the cores, spinning threads starve the workers")
    p.add_argument("--eval-lens", type=str, default="1024,4096,8192,16384")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-batch", type=int, default=25)
    p.add_argument("--eval-attn", type=str, default="sdpa")
    p.add_argument("--eval-dtype", type=str, default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on CUDA (flash SDPA with GQA; fp32 SDPA with GQA falls back "
                        "to the math kernel, which needs B*Hq*L*L*4 bytes), float32 on the CPU")
    p.add_argument("--eval-budget", type=float, default=0.0,
                   help="seconds for evaluation (0: no limit); cells run shortest length first and "
                        "those left when it is spent are reported as null")
    p.add_argument("--model", type=str, default="", help="config overrides, e.g. 'num_hidden_layers=2,hidden_size=64'")
    return p.parse_args(argv)


def parse_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        out[k.strip()] = float(v) if "." in v or "e" in v else int(v)
    return out


def copy_sequence(rng: np.random.Generator, length: int):
    """Auxiliary induction drill: BOS then random tokens (markers, digits, filler, keys)
    in which random spans of 6..24 tokens reappear later at random offsets; every token
    of a repeat but its first is a target.  The random offsets leave content matching
    (match the previous occurrence, copy its successor) as the only way to predict."""
    ids = rng.integers(T.SEP, T.KEY_HI, size=length)
    ids[0] = T.BOS
    mask = np.zeros(length, dtype=bool)
    n_spans = max(1, length // 64)
    for _ in range(n_spans):
        span = int(rng.integers(6, 25))
        if length < 2 * span + 2:
            break
        dst = int(rng.integers(span + 1, length - span + 1))
        src = int(rng.integers(1, dst - span + 1))
        ids[dst : dst + span] = ids[src : src + span]
        mask[dst : dst + span] = False
        mask[dst + 1 : dst + span] = True
    return ids, mask


RECORD_LEN = {"passkey": 1 + T.PASSKEY_DIGITS, "kv": T.KV_RECORD_LEN, "needle": 5 + T.NEEDLE_DIGITS + 1}


def make_batch(seed, length: int, batch: int, copy_frac: float = 0.0, pose_max: int = 0):
    """``batch`` training rows of ``length`` tokens from the stream ``seed``: the three
    tasks uniformly (several questions each; in short rows records fill at most half the
    row), a ``copy_frac`` share of copy drills, and with ``pose_max`` stretched position
    ids.  Returns numpy ids, target mask, per-row task index (-1: drill) and positions (or None)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((batch, length), dtype=np.int64)
    mask = np.empty((batch, length), dtype=bool)
    row_task = np.empty(batch, dtype=np.int64)  # index into T.TASKS, -1 for a copy drill
    for b in range(batch):
        if copy_frac > 0 and rng.random() < copy_frac:
            ids[b], mask[b] = copy_sequence(rng, length)
            row_task[b] = -1
            continue
        row_task[b] = int(rng.integers(len(T.TASKS)))
        task = T.TASKS[row_task[b]]
        cap = max(1, (length // 2) // RECORD_LEN[task])
        nq = int(rng.integers(1, min(MAX_QUERIES[task], cap) + 1))
        while True:
            try:
                ids[b], mask[b], _ = T.make_sequence(task, length, rng, n_queries=nq, max_records=cap)
                break
            except ValueError:
                if nq == 1:
                    raise
                nq -= 1
    pos = stretched_positions(rng, batch, length, pose_max) if pose_max > length else None
    return ids, mask, row_task, pos


def stretched_positions(rng: np.random.Generator, batch: int, length: int, pose_max: int) -> np.ndarray:
    """Position ids 0..length-1 with one jump of a random offset at a random split, so
    that relative distances up to ``pose_max`` appear."""
    pos = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    for b in range(batch):
        split = int(rng.integers(1, length))
        offset = int(rng.integers(0, pose_max - length + 1))
        pos[b, split:] += offset
    return pos


def lr_at(args, step: int, frac: float) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if frac <= args.decay_start:
        decay = 1.0
    else:
        x = min(1.0, (frac - args.decay_start) / max(1e-9, 1.0 - args.decay_start))
        decay = args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * x))
    return args.lr * warm * decay


class Curriculum:
    """Context lengths min_len, 2*min_len, ..., max_len.  Stage s+1 starts once the
    running answer-token accuracy of the worst task at stage s's length reaches ``advance_acc`` (after
    ``min_steps`` steps there), or at ``deadline[s+1]`` of the budget provided the
    accuracy is at least ``deadline_min_acc`` (the retrieval circuit exists)."""

    def __init__(self, args):
        self.lengths = []
        L = args.min_len
        while L < args.max_len:
            self.lengths.append(L)
            L *= 2
        self.lengths.append(args.max_len)
        n = len(self.lengths)
        self.deadline = [args.reach_max_at * s / max(1, n - 1) for s in range(n)]
        self.args = args
        self.stage, self.stage_steps, self.ema, self.ema_n = 0, 0, 0.0, 0
        self.task_ema = [None] * len(T.TASKS)
        self.history = []

    @property
    def length(self) -> int:
        return self.lengths[self.stage]

    @property
    def last(self) -> bool:
        return self.stage == len(self.lengths) - 1

    def record(self, stage: int, per_task) -> None:
        """Fold one step's per-task [hits], [targets] into the per-task running
        accuracies; ``ema`` is the worst task's (0 until every task has been seen)."""
        if stage != self.stage:
            return
        hits, counts = per_task
        for i, (h, c) in enumerate(zip(hits, counts)):
            if c > 0:
                a = h / c
                self.task_ema[i] = a if self.task_ema[i] is None else 0.9 * self.task_ema[i] + 0.1 * a
        self.ema_n += 1
        self.ema = 0.0 if None in self.task_ema else min(self.task_ema)

    def task_ema_str(self) -> str:
        return "/".join("-" if e is None else f"{e:.3f}" for e in self.task_ema)

    def maybe_advance(self, step: int, elapsed: float, frac: float) -> None:
        a = self.args
        while not self.last:
            by_acc = self.ema >= a.advance_acc and self.ema_n >= a.min_stage_steps
            by_time = frac >= self.deadline[self.stage + 1] and self.ema >= a.deadline_min_acc
            if not (by_acc or by_time):
                return
            self.stage += 1
            self.stage_steps, self.ema, self.ema_n = 0, 0.0, 0
            self.task_ema = [None] * len(T.TASKS)
            why = "accuracy" if by_acc else "deadline"
            log(f"step {step}: stage {self.stage} -> length {self.length} ({why}, t={elapsed:.0f}s)")
            self.history.append({"step": step, "time_s": round(elapsed, 1), "stage": self.stage,
                                 "length": self.length, "why": why})


def train(args, model, device, pool=None) -> dict:
    cur = Curriculum(args)
    log(f"curriculum {cur.lengths}, stage deadlines (fraction of budget) {[round(d, 3) for d in cur.deadline]}")
    plan_rng = np.random.default_rng([args.seed, 7])  # length choices; batches have their own streams

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    # batches are generated ahead in worker processes; the length of a batch is decided
    # when it is requested (``--prefetch`` steps ahead of its use)
    queue: deque = deque()
    n_req = 0

    def request():
        nonlocal n_req
        at_stage = not (cur.stage > 0 and plan_rng.random() < args.mix_shorter)
        length = cur.length if at_stage else cur.lengths[int(plan_rng.integers(0, cur.stage))]
        batch = max(1, args.tokens_per_batch // length)
        copy = args.copy_frac if length <= args.copy_max_len else 0.0
        pose = args.pose_max if (at_stage and cur.last and plan_rng.random() < args.pose_prob) else 0
        seed = [args.seed, 11, n_req]
        n_req += 1
        fut = pool.submit(make_batch, seed, length, batch, copy, pose) if pool else make_batch(seed, length, batch, copy, pose)
        queue.append((cur.stage if at_stage else -1, fut))

    model.train()
    step, tokens, answer_tokens = 0, 0, 0
    pending = []  # (stage, accuracy on device) of recent steps, read every --sync-every steps
    t0 = time.time()
    last_log_t, last_log_tokens = t0, 0
    while True:
        elapsed = time.time() - t0
        frac = elapsed / args.time_budget
        if elapsed >= args.time_budget or (args.max_steps and step >= args.max_steps):
            break
        if len(pending) >= args.sync_every:
            for st, pt in pending:  # one device sync for several steps
                cur.record(st, pt.tolist())
            pending.clear()
        before = cur.stage
        cur.maybe_advance(step, elapsed, frac)
        if cur.stage != before:  # drop batches planned for the old stage
            for _, fut in queue:
                if pool:
                    fut.cancel()
            queue.clear()
        while len(queue) < max(1, args.prefetch):
            request()
        stage_of_batch, fut = queue.popleft()
        ids, mask, row_task, pos = fut.result() if pool else fut
        batch, length = ids.shape
        # flat indices of the positions whose next token is a target (built on the host:
        # no device sync for boolean indexing)
        src = np.flatnonzero(mask[:, 1:])
        targets = ids[:, 1:].reshape(-1)[src]
        task_t = np.repeat(row_task, length - 1)[src]  # task of each target, -1: drill
        n_task = int((task_t >= 0).sum())
        ids, src, targets, task_t = (torch.from_numpy(np.ascontiguousarray(x)) for x in (ids, src, targets, task_t))
        pos = torch.from_numpy(pos) if pos is not None else None
        if device.type == "cuda":
            ids, src, targets, task_t = (x.pin_memory().to(device, non_blocking=True) for x in (ids, src, targets, task_t))
            if pos is not None:
                pos = pos.pin_memory().to(device, non_blocking=True)

        lr = lr_at(args, step, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        with amp:
            # with position ids and no mask transformers treats every jump of the ids as the
            # start of a packed sequence and masks across it: an all-ones mask keeps one
            # sequence per row
            am = torch.ones_like(ids) if pos is not None else None
            hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=am, use_cache=False).last_hidden_state
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            logits = model.lm_head(h.index_select(0, src)).float()
            loss = F.cross_entropy(logits, targets)
            if args.lm_weight > 0:
                keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
                keep[src] = False
                lm = F.cross_entropy(model.lm_head(h[keep]).float(), ids[:, 1:].reshape(-1)[keep])
                loss = loss + args.lm_weight * lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        with torch.no_grad():
            # per task: [hits, targets]; the curriculum follows the worst task
            hit = (logits.argmax(-1) == targets).float()
            onehot = (task_t[:, None] == torch.arange(len(T.TASKS), device=task_t.device)[None]).float()
            per_task = torch.stack([hit @ onehot, onehot.sum(0)])
            acc_t = per_task[0].sum() / max(1, n_task)
        if stage_of_batch >= 0 and n_task > 0:
            pending.append((stage_of_batch, per_task))
        step += 1
        cur.stage_steps += 1
        tokens += ids.numel()
        answer_tokens += n_task
        if step % args.log_every == 0:
            now = time.time()
            tps = (tokens - last_log_tokens) / max(1e-9, now - last_log_t)
            last_log_t, last_log_tokens = now, tokens
            log(
                f"step {step} t={now - t0:.0f}s len={length} bs={batch} loss={loss.item():.4f} "
                f"acc={acc_t.item():.3f} task-ema@{cur.length}={cur.task_ema_str()} lr={lr:.2e} "
                f"gnorm={gnorm.item():.2f} tok/s={tps:,.0f}"
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.time() - t0
    log(f"training done: {step} steps, {tokens:,} tokens, {train_time:.0f}s, final stage length {cur.length}, ema {cur.ema:.3f}")
    model.eval()
    return {
        "steps": step,
        "tokens": tokens,
        "answer_tokens": answer_tokens,
        "train_time_s": round(train_time, 1),
        "tokens_per_s": round(tokens / max(1e-9, train_time)),
        "final_stage_length": cur.length,
        "final_train_answer_token_acc_ema_worst_task": round(cur.ema, 4),
        "final_train_answer_token_acc_ema_per_task": dict(zip(T.TASKS, cur.task_ema)),
        "curriculum": cur.lengths,
        "stage_changes": cur.history,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    overrides = parse_overrides(args.model)
    # data workers are forked before CUDA is initialised in this process
    pool = ProcessPoolExecutor(max_workers=args.workers) if args.workers > 0 else None
    model = acc_model.build_accuracy_model(seed=args.seed, attn_implementation="sdpa", **overrides).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}), "
        f"torch {torch.__version__}, params {n_params:,}, overrides {overrides}")

    stats = train(args, model, device, pool)
    if pool:
        pool.shutdown(wait=False, cancel_futures=True)

    acc_model.save_accuracy_model(model, args.out_dir)
    size = (args.out_dir / "model.safetensors").stat().st_size
    log(f"saved {args.out_dir} (model.safetensors {size / 2**20:.2f} MiB)")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # held-out dense accuracy of the weights exactly as saved (bf16 on disk)
    t1 = time.time()
    eval_dtype = args.eval_dtype if args.eval_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    m = acc_model.load_accuracy_model(args.out_dir, attn_implementation=args.eval_attn, device=device,
                                      dtype=getattr(torch, eval_dtype))
    lens = [int(x) for x in args.eval_lens.split(",") if x]
    table: dict = {task: {} for task in T.TASKS}
    errors: dict = {}
    for L in sorted(lens):
        for task in T.TASKS:
            if args.eval_budget and time.time() - t1 > args.eval_budget:
                table[task][str(L)] = None
                log(f"eval {task:8s} @ {L:6d}: skipped (eval budget spent)")
                continue
            ts = time.time()
            samples = T.make_samples(task, L, args.eval_n, seed=args.eval_seed)
            try:
                acc = T.answer_accuracy(m, samples, batch_size=args.eval_batch)
            except Exception as exc:  # e.g. out of memory: keep the weights and the other cells
                errors[f"{task}@{L}"] = repr(exc)[:500]
                table[task][str(L)] = None
                log(f"eval {task:8s} @ {L:6d}: FAILED {exc!r:.200}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            table[task][str(L)] = acc
            log(f"eval {task:8s} @ {L:6d}: {acc:.3f} (n={args.eval_n}, {time.time() - ts:.1f}s)")
    eval_time = time.time() - t1
    results = {
        "dense_accuracy": table,
        "eval": {"n_per_cell": args.eval_n, "seed": args.eval_seed, "attn_implementation": args.eval_attn,
                 "dtype": f"{eval_dtype} (weights stored bf16)", "device": str(device), "time_s": round(eval_time, 1), "errors": errors},
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
        print(f"{task:10s}" + "".join("    skip" if table[task][str(L)] is None else f"{table[task][str(L)]:8.3f}" for L in lens))
    if args.install:
        acc_model.ASSET_DIR.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "model.safetensors", "results.json"):
            shutil.copy2(args.out_dir / f, acc_model.ASSET_DIR / f)
        log(f"installed into {acc_model.ASSET_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
