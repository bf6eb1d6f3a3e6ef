#!/usr/bin/env python3
"""Train the project's long-context accuracy model on the synthetic retrieval tasks.

Reproducible up to the wall-clock budget: data, initialisation and the curriculum's
random draws come from --seed; the number of steps is what fits in --time-budget
seconds (the learning-rate schedule follows elapsed time), so it depends on the machine.

    python benchmarks/accuracy/train_accuracy_model.py --time-budget 280 --out-dir out/acc

(the shipped model's exact command is in benchmarks/accuracy/README.md)

    # the head-dim-128 model, 2400 s of training spread over calls of at most 480 s each:
    python benchmarks/accuracy/train_accuracy_model.py --model geometry128 --out-dir out/g128 \
        --time-budget 2400 --call-budget 480 --resume --text-frac 0.25 --max-len 16384

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
  * --text-frac of the rows are natural text (the Python sources of the installed packages,
    byte tokens, gsa_compile.accuracy.text; needs a model whose vocabulary holds them, e.g.
    --model geometry128), trained on plain next-token prediction with weight --text-weight
    against the answer/drill loss;
  * bf16 autocast on CUDA, fp32 master weights, AdamW, warm-up then cosine decay;
  * training spread over several calls: --call-budget ends this call's training after that
    many seconds; the full state (fp32 weights, AdamW moments, step, elapsed training time,
    curriculum stage and running accuracies, the data streams' RNG) goes to --ckpt-dir
    (every --save-every seconds too) and the bf16 weights (shards of at most --shard-size)
    with trainer_state.json to --out-dir; --resume continues from --ckpt-dir, or, where only
    --out-dir's portable state exists (a fresh machine), from its weights with the AdamW
    moments restarted (a new warm-up); the schedule and curriculum deadlines follow the
    training time summed over calls, so N calls of B seconds train like one of N*B;
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
import warnings
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
    from gsa_compile.accuracy import text as TXT  # noqa: E402
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
    from gsa_compile.accuracy import text as TXT  # noqa: E402

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
    p.add_argument("--model", type=str, default="",
                   help="NAME[,key=value...]: a named config of gsa_compile.accuracy.model (default, "
                        "geometry128) and overrides, e.g. 'geometry128,num_hidden_layers=2' or "
                        "'num_hidden_layers=2,hidden_size=64' (the default config)")
    p.add_argument("--text-frac", type=float, default=0.0, help="share of rows that are natural text")
    p.add_argument("--text-weight", type=float, default=1.0, help="weight of the text loss against the task loss")
    p.add_argument("--text-bytes", type=int, default=64 << 20, help="size of the text corpus")
    p.add_argument("--text-roots", type=str, default="",
                   help="colon-separated folders the corpus is read from (default: this Python's site-packages)")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="full training state (default OUT_DIR/ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir or OUT_DIR's portable state")
    p.add_argument("--call-budget", type=float, default=0.0,
                   help="training seconds of this call (0: up to --time-budget); then save and exit")
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints during a call")
    p.add_argument("--shard-size", type=str, default="16MB",
                   help="largest file of the saved bf16 weights (16 MB: under 16 MiB, the largest file a device call returns)")
    return p.parse_args(argv)


def parse_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        out[k.strip()] = float(v) if "." in v or "e" in v else int(v)
    return out


def parse_model_spec(text: str) -> tuple[str, dict]:
    """'NAME,key=value,...' -> (NAME, overrides); a spec of overrides alone names the default config."""
    items = [item for item in text.split(",") if item]
    name = "default"
    if items and "=" not in items[0]:
        name = items.pop(0)
    return name, parse_overrides(",".join(items))


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


DRILL, TEXT = -1, -2  # row_task of a copy drill and of a text row

_CORPORA: dict = {}  # path -> memory-mapped corpus, once per (worker) process


def make_batch(seed, length: int, batch: int, copy_frac: float = 0.0, pose_max: int = 0,
               text_frac: float = 0.0, corpus_path=None):
    """``batch`` training rows of ``length`` tokens from the stream ``seed``: the three
    tasks uniformly (several questions each; in short rows records fill at most half the
    row), a ``copy_frac`` share of copy drills, a ``text_frac`` share of text rows from the
    corpus at ``corpus_path``, and with ``pose_max`` stretched position ids.  Returns numpy
    ids, target mask, per-row task index (DRILL, TEXT or an index of T.TASKS) and positions
    (or None)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((batch, length), dtype=np.int64)
    mask = np.empty((batch, length), dtype=bool)
    row_task = np.empty(batch, dtype=np.int64)
    for b in range(batch):
        if text_frac > 0 and rng.random() < text_frac:
            if corpus_path not in _CORPORA:
                _CORPORA[corpus_path] = TXT.load_corpus(corpus_path)
            rows, rows_mask = TXT.text_rows(rng, _CORPORA[corpus_path], length, 1)
            ids[b], mask[b] = rows[0], rows_mask[0]
            row_task[b] = TEXT
            continue
        if copy_frac > 0 and rng.random() < copy_frac:
            ids[b], mask[b] = copy_sequence(rng, length)
            row_task[b] = DRILL
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


def lr_at(args, step: int, frac: float, warm_from: int = 0) -> float:
    """Warm-up over --warmup-steps from ``warm_from`` (the step the AdamW moments last started
    from zero), constant, then cosine decay over the training time after --decay-start."""
    warm = min(1.0, (step - warm_from + 1) / max(1, args.warmup_steps))
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

    STATE = ("stage", "stage_steps", "ema", "ema_n", "task_ema", "history")

    def state_dict(self) -> dict:
        return {"lengths": self.lengths, **{name: getattr(self, name) for name in self.STATE}}

    def load_state_dict(self, state: dict) -> None:
        if state["lengths"] != self.lengths:
            raise ValueError(f"the checkpoint's curriculum {state['lengths']} differs from this run's {self.lengths} "
                             "(--min-len / --max-len must stay as they were)")
        for name in self.STATE:
            setattr(self, name, state[name])

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


CKPT_FILE = "checkpoint.pt"
STATE_FILE = "trainer_state.json"


class TrainState:
    """Everything but the weights and the optimizer that a resumed call needs."""

    def __init__(self):
        self.step = 0
        self.tokens = 0
        self.answer_tokens = 0
        self.text_tokens = 0
        self.elapsed = 0.0  # training seconds summed over calls
        self.n_req = 0  # batches requested (each has its own seeded stream)
        self.warm_from = 0  # step where the AdamW moments last started from zero
        self.calls = []  # per call: steps, seconds, how it started

    def to_dict(self, cur, plan_rng) -> dict:
        return {**vars(self), "curriculum": cur.state_dict(), "plan_rng": plan_rng.bit_generator.state}

    def load(self, state: dict, cur, plan_rng) -> None:
        for name in vars(self):
            setattr(self, name, state[name])
        cur.load_state_dict(state["curriculum"])
        plan_rng.bit_generator.state = state["plan_rng"]


def save_checkpoint(args, model, opt, cur, plan_rng, state: TrainState, meta: dict) -> None:
    """Full state into --ckpt-dir; bf16 weights and trainer_state.json (the portable state a
    fresh machine resumes from) into --out-dir. Files are replaced atomically."""
    t = time.time()
    trainer = {**state.to_dict(cur, plan_rng), **meta}
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = args.ckpt_dir / (CKPT_FILE + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": trainer,
                "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, args.ckpt_dir / CKPT_FILE)
    acc_model.save_accuracy_model(model, args.out_dir, max_shard_size=args.shard_size)
    tmp = args.out_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(trainer, indent=1))
    os.replace(tmp, args.out_dir / STATE_FILE)
    log(f"checkpoint at step {state.step} ({state.elapsed:.0f}s trained) -> {args.ckpt_dir / CKPT_FILE}, "
        f"{args.out_dir} ({time.time() - t:.1f}s)")


def resume(args, model, opt, cur, plan_rng, state: TrainState, meta: dict) -> str:
    """Load the newest state there is; returns how ("full", "weights", or "fresh")."""
    ckpt = args.ckpt_dir / CKPT_FILE
    portable = args.out_dir / STATE_FILE
    if ckpt.is_file():
        data = torch.load(ckpt, map_location="cpu", weights_only=False)
        _check_same_run(data["trainer"], meta)
        model.load_state_dict(data["model"])
        opt.load_state_dict(data["optimizer"])
        state.load(data["trainer"], cur, plan_rng)
        torch.set_rng_state(data["torch_rng"])
        log(f"resumed the full state of step {state.step} ({state.elapsed:.0f}s trained) from {ckpt}")
        return "full"
    if portable.is_file() and acc_model.has_weights(args.out_dir):
        trainer = json.loads(portable.read_text())
        _check_same_run(trainer, meta)
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(args.out_dir.glob("model*.safetensors")):
            weights.update(load_file(f))
        # tied embeddings are saved once
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ValueError(f"weights in {args.out_dir} do not fit the model: missing {missing}, unexpected {unexpected}")
        state.load(trainer, cur, plan_rng)
        state.warm_from = state.step
        log(f"resumed the weights of step {state.step} ({state.elapsed:.0f}s trained) from {args.out_dir}; "
            f"no optimizer state there ({ckpt} is missing): AdamW moments restart with a new warm-up")
        return "weights"
    log(f"--resume: no state in {args.ckpt_dir} or {args.out_dir}; starting fresh")
    return "fresh"


def _check_same_run(trainer: dict, meta: dict) -> None:
    for key in ("model_spec", "seed"):
        if trainer.get(key) != meta[key]:
            raise ValueError(f"the checkpoint was trained with {key}={trainer.get(key)!r}, this run has {meta[key]!r}")
    if trainer.get("corpus_sha256") != meta["corpus_sha256"]:
        warnings.warn(f"the text corpus differs from the checkpoint's ({trainer.get('corpus_sha256')} vs "
                      f"{meta['corpus_sha256']}): the installed packages changed")


def train(args, model, device, pool=None, corpus=None, meta=None) -> dict:
    """Train until --time-budget seconds of training in all (or this call's --call-budget,
    or --max-steps); returns the statistics, with "finished" false when the total budget is
    not yet spent."""
    cur = Curriculum(args)
    log(f"curriculum {cur.lengths}, stage deadlines (fraction of budget) {[round(d, 3) for d in cur.deadline]}")
    plan_rng = np.random.default_rng([args.seed, 7])  # length choices; batches have their own streams
    meta = dict(meta or {})

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    state = TrainState()
    how = resume(args, model, opt, cur, plan_rng, state, meta) if args.resume else "fresh"

    # batches are generated ahead in worker processes; the length of a batch is decided
    # when it is requested (``--prefetch`` steps ahead of its use)
    queue: deque = deque()

    def request():
        at_stage = not (cur.stage > 0 and plan_rng.random() < args.mix_shorter)
        length = cur.length if at_stage else cur.lengths[int(plan_rng.integers(0, cur.stage))]
        batch = max(1, args.tokens_per_batch // length)
        copy = args.copy_frac if length <= args.copy_max_len else 0.0
        pose = args.pose_max if (at_stage and cur.last and plan_rng.random() < args.pose_prob) else 0
        seed = [args.seed, 11, state.n_req]
        state.n_req += 1
        job = (seed, length, batch, copy, pose, args.text_frac, corpus)
        fut = pool.submit(make_batch, *job) if pool else make_batch(*job)
        queue.append((cur.stage if at_stage else -1, fut))

    model.train()
    first_step = state.step
    pending = []  # (stage, accuracy on device) of recent steps, read every --sync-every steps

    def fold_pending():
        for st, pt in pending:  # one device sync for several steps
            cur.record(st, pt.tolist())
        pending.clear()

    t0 = time.time()
    prior = state.elapsed
    last_log_t, last_log_tokens, last_save = t0, state.tokens, t0
    finished = False
    while True:
        now = time.time()
        state.elapsed = prior + now - t0
        frac = state.elapsed / args.time_budget
        if state.elapsed >= args.time_budget or (args.max_steps and state.step >= args.max_steps):
            finished = True
            break
        if args.call_budget and now - t0 >= args.call_budget:
            break
        if args.save_every and now - last_save >= args.save_every:
            fold_pending()
            save_checkpoint(args, model, opt, cur, plan_rng, state, meta)
            last_save = time.time()
        if len(pending) >= args.sync_every:
            fold_pending()
        before = cur.stage
        cur.maybe_advance(state.step, state.elapsed, frac)
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
        task_t = np.repeat(row_task, length - 1)[src]  # task of each target (DRILL, TEXT or a task)
        n_task = int((task_t >= 0).sum())
        n_text = int((task_t == TEXT).sum())
        ids, src, targets, task_t = (torch.from_numpy(np.ascontiguousarray(x)) for x in (ids, src, targets, task_t))
        pos = torch.from_numpy(pos) if pos is not None else None
        if device.type == "cuda":
            ids, src, targets, task_t = (x.pin_memory().to(device, non_blocking=True) for x in (ids, src, targets, task_t))
            if pos is not None:
                pos = pos.pin_memory().to(device, non_blocking=True)

        lr = lr_at(args, state.step, frac, state.warm_from)
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
            per_target = F.cross_entropy(logits, targets, reduction="none")
            # answers and drills, and text, each averaged over its own targets: text rows hold
            # a target at every position and would otherwise drown the few answer tokens
            is_text = (task_t == TEXT).float()
            loss = (per_target * (1 - is_text)).sum() / max(1, len(src) - n_text)
            text_loss = (per_target * is_text).sum() / max(1, n_text)
            if n_text:
                loss = loss + args.text_weight * text_loss
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
        state.step += 1
        cur.stage_steps += 1
        state.tokens += ids.numel()
        state.answer_tokens += n_task
        state.text_tokens += n_text
        if state.step % args.log_every == 0:
            now = time.time()
            tps = (state.tokens - last_log_tokens) / max(1e-9, now - last_log_t)
            last_log_t, last_log_tokens = now, state.tokens
            text = f" text-loss={text_loss.item():.3f}" if n_text else ""
            log(
                f"step {state.step} t={state.elapsed:.0f}s len={length} bs={batch} loss={loss.item():.4f}{text} "
                f"acc={acc_t.item():.3f} task-ema@{cur.length}={cur.task_ema_str()} lr={lr:.2e} "
                f"gnorm={gnorm.item():.2f} tok/s={tps:,.0f}"
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    for _, fut in queue:
        if pool:
            fut.cancel()
    fold_pending()
    call_time = time.time() - t0
    state.elapsed = prior + call_time
    state.calls.append({"start": how, "first_step": first_step, "steps": state.step - first_step,
                        "seconds": round(call_time, 1)})
    save_checkpoint(args, model, opt, cur, plan_rng, state, meta)
    log(f"training {'done' if finished else 'paused (call budget spent)'}: {state.step} steps, {state.tokens:,} tokens, "
        f"{state.elapsed:.0f}s in {len(state.calls)} call(s), final stage length {cur.length}, ema {cur.ema:.3f}")
    model.eval()
    return {
        "finished": finished,
        "steps": state.step,
        "tokens": state.tokens,
        "answer_tokens": state.answer_tokens,
        "text_tokens": state.text_tokens,
        "train_time_s": round(state.elapsed, 1),
        "tokens_per_s": round(state.tokens / max(1e-9, state.elapsed)),
        "calls": state.calls,
        "final_stage_length": cur.length,
        "final_train_answer_token_acc_ema_worst_task": round(cur.ema, 4),
        "final_train_answer_token_acc_ema_per_task": dict(zip(T.TASKS, cur.task_ema)),
        "curriculum": cur.lengths,
        "stage_changes": cur.history,
    }


def prepare_corpus(args, vocab_size: int):
    """(path, stats) of the text corpus in --ckpt-dir, built on first use; (None, None)
    without text rows."""
    if args.text_frac <= 0:
        return None, None
    if vocab_size < TXT.TEXT_VOCAB_SIZE:
        raise ValueError(f"--text-frac needs a model whose vocabulary holds the byte tokens "
                         f"({TXT.TEXT_VOCAB_SIZE} ids, e.g. --model geometry128); this one has {vocab_size}")
    path = args.ckpt_dir / "corpus.bin"
    stats_path = args.ckpt_dir / "corpus.json"
    if args.resume and path.is_file() and stats_path.is_file():
        return path, json.loads(stats_path.read_text())
    roots = [Path(r) for r in args.text_roots.split(":") if r] or None
    stats = TXT.build_corpus(path, args.text_bytes, roots)
    stats_path.write_text(json.dumps(stats))
    log(f"text corpus: {stats['files']} files, {stats['bytes']:,} bytes from {stats['roots']}")
    return path, stats


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.ckpt_dir = args.ckpt_dir or args.out_dir / "ckpt"
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    name, overrides = parse_model_spec(args.model)
    if args.install and (name != "default" or overrides):
        raise ValueError(f"--install replaces the shipped default model in {acc_model.ASSET_DIR}; "
                         f"this run trains {args.model!r}: leave --install out")
    config = acc_model.accuracy_model_config(name, **overrides)
    corpus, corpus_stats = prepare_corpus(args, config.vocab_size)
    # data workers are forked before CUDA is initialised in this process
    pool = ProcessPoolExecutor(max_workers=args.workers) if args.workers > 0 else None
    model = acc_model.build_accuracy_model(config, seed=args.seed, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}), "
        f"torch {torch.__version__}, params {n_params:,}, model {name} overrides {overrides}")
    meta = {"model_spec": args.model, "seed": args.seed, "corpus_sha256": corpus_stats and corpus_stats["sha256"]}

    stats = train(args, model, device, pool, corpus, meta)
    if pool:
        pool.shutdown(wait=False, cancel_futures=True)
    size = sum(f.stat().st_size for f in args.out_dir.glob("model*.safetensors"))
    log(f"saved {args.out_dir} (bf16 weights {size / 2**20:.2f} MiB)")
    if not stats["finished"]:
        log(f"{args.time_budget - stats['train_time_s']:.0f}s of --time-budget left: run again with --resume")
        return 0
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
        "text_corpus": corpus_stats,
        "model": {"name": name, "params": n_params, "safetensors_bytes": size,
                  "config": json.loads((args.out_dir / "config.json").read_text())},
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
