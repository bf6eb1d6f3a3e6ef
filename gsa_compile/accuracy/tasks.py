"""Seeded synthetic long-context retrieval tasks over a small integer vocabulary.

No tokenizer: every token is an integer id of the layout below. Three tasks, each a
prompt of exactly ``context_len`` tokens that ends with a question whose answer is a
short run of digit tokens.

Token layout (``VOCAB_SIZE`` = 512)::

    0        PAD
    1        BOS            first token of every prompt
    2        EOS            reserved (never in a prompt or an answer)
    3        SEP            closes a record (kv / needle)
    4        QUERY          starts the question at the end of the prompt
    5        TASK_PASSKEY   second token of a passkey prompt
    6        TASK_KV        second token of a key-value prompt
    7        TASK_NEEDLE    second token of a needle prompt
    8        PASSKEY_MARK   "the pass key is"
    9        KEY_MARK       starts a key-value record
    10       VALUE_MARK     "its value is"
    11       NEEDLE_MARK    starts a needle
    16..25   DIGIT_0..DIGIT_9   (digit d is token 16 + d)
    32..287  filler words (256 ids, drawn i.i.d. uniform)
    288..415 key / name symbols (128 ids)
    416..511 unused

Tasks (``[...]`` is a run of filler; records are placed at uniform random,
non-overlapping positions inside the filler):

``passkey``  one 5-digit pass key hidden in filler, asked at the end::

    BOS TASK_PASSKEY [...] PASSKEY_MARK d d d d d [...] QUERY PASSKEY_MARK
    answer: d d d d d

``kv``  multi-key associative recall: 16..64 records with distinct single-token keys
and 3-digit values scattered in filler (prompts shorter than 896 tokens hold fewer, so
that records fill at most half of the prompt; never fewer than 16); one key is asked::

    BOS TASK_KV [...] KEY_MARK k VALUE_MARK v v v SEP [...] KEY_MARK k' ... [...]
    QUERY KEY_MARK k VALUE_MARK
    answer: v v v

``needle``  a needle among similar distractors: 5..8 needles named by two symbols
(a, b), with a taken from 2 symbols and b from 4, so every needle shares a name symbol
with others and only the pair identifies it; 4-digit values; one needle is asked::

    BOS TASK_NEEDLE [...] NEEDLE_MARK a b VALUE_MARK d d d d SEP [...] ...
    QUERY NEEDLE_MARK a b VALUE_MARK
    answer: d d d d

The question repeats the record's prefix, so the answer is always the continuation of
the matching record in the context.  A :class:`Sample` holds the prompt
(``input_ids``, length ``context_len``) and the ``answer`` ids; the full sequence the
model should produce is ``cat(input_ids, answer)``.

``make_sequence`` also builds training sequences that ask several questions in a row
(question, answer, question, answer, ...) with a mask of the answer positions; the first
question of such a sequence has exactly the layout of an evaluation prompt.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

PAD, BOS, EOS, SEP, QUERY = 0, 1, 2, 3, 4
TASK_PASSKEY, TASK_KV, TASK_NEEDLE = 5, 6, 7
PASSKEY_MARK, KEY_MARK, VALUE_MARK, NEEDLE_MARK = 8, 9, 10, 11
DIGIT0 = 16
FILLER_LO, FILLER_HI = 32, 288  # [lo, hi)
KEY_LO, KEY_HI = 288, 416
VOCAB_SIZE = 512

TASKS = ("passkey", "kv", "needle")
TASK_TOKEN = {"passkey": TASK_PASSKEY, "kv": TASK_KV, "needle": TASK_NEEDLE}

PASSKEY_DIGITS = 5
KV_VALUE_DIGITS = 3
KV_PAIRS = (16, 64)  # inclusive range of records per prompt
KV_RECORD_LEN = 4 + KV_VALUE_DIGITS  # KEY_MARK k VALUE_MARK v v v SEP
NEEDLE_DIGITS = 4
NEEDLE_COUNT = (5, 8)  # inclusive range; with 5+ of the 2x4 names, each shares a symbol with another
NEEDLE_A, NEEDLE_B = 2, 4  # name symbols: a from 2, b from 4 (2 * 4 >= max needles)

# question lengths (tokens) and answer lengths per task
QUESTION_LEN = {"passkey": 2, "kv": 4, "needle": 5}
ANSWER_LEN = {"passkey": PASSKEY_DIGITS, "kv": KV_VALUE_DIGITS, "needle": NEEDLE_DIGITS}
HEADER_LEN = 2  # BOS, task token


def min_context_len(task: str) -> int:
    """Shortest prompt the task fits in (all records, no filler)."""
    _check_task(task)
    if task == "passkey":
        body = 1 + PASSKEY_DIGITS
    elif task == "kv":
        body = KV_PAIRS[0] * KV_RECORD_LEN
    else:
        body = NEEDLE_COUNT[1] * (5 + NEEDLE_DIGITS)
    return HEADER_LEN + body + QUESTION_LEN[task]


def _kv_pairs_max(total_len: int) -> int:
    return min(KV_PAIRS[1], max(KV_PAIRS[0], (total_len // 2) // KV_RECORD_LEN))


@dataclass(frozen=True)
class Sample:
    """One evaluation item: ``input_ids`` (1-D LongTensor, length ``context_len``) is the
    prompt ending with the question; ``answer`` (1-D LongTensor) the expected tokens."""

    task: str
    context_len: int
    input_ids: torch.Tensor
    answer: torch.Tensor
    # index in input_ids of the first token of the record that holds the answer
    answer_record_pos: int


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _digits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 10, size=n) + DIGIT0


def _records(task: str, rng: np.random.Generator, total_len: int, max_records: int | None = None):
    """The records of one prompt as (list of int64 arrays, list of (question, answer)
    pairs, one per record that may be asked; passkey has one)."""
    cap = 1 << 30 if max_records is None else max(1, int(max_records))
    if task == "passkey":
        key = _digits(rng, PASSKEY_DIGITS)
        rec = np.concatenate([[PASSKEY_MARK], key])
        return [rec], [(np.array([QUERY, PASSKEY_MARK]), key)]
    if task == "kv":
        hi = min(_kv_pairs_max(total_len), cap)
        n = int(rng.integers(min(KV_PAIRS[0], hi), hi + 1))
        keys = rng.choice(np.arange(KEY_LO, KEY_HI), size=n, replace=False)
        recs, qas = [], []
        for k in keys:
            v = _digits(rng, KV_VALUE_DIGITS)
            recs.append(np.concatenate([[KEY_MARK, k, VALUE_MARK], v, [SEP]]))
            qas.append((np.array([QUERY, KEY_MARK, k, VALUE_MARK]), v))
        return recs, qas
    hi = min(NEEDLE_COUNT[1], cap)
    n = int(rng.integers(min(NEEDLE_COUNT[0], hi), hi + 1))
    syms = rng.choice(np.arange(KEY_LO, KEY_HI), size=NEEDLE_A + NEEDLE_B, replace=False)
    a_syms, b_syms = syms[:NEEDLE_A], syms[NEEDLE_A:]
    pairs = rng.choice(NEEDLE_A * NEEDLE_B, size=n, replace=False)
    recs, qas = [], []
    for p in pairs:
        a, b = a_syms[p // NEEDLE_B], b_syms[p % NEEDLE_B]
        v = _digits(rng, NEEDLE_DIGITS)
        recs.append(np.concatenate([[NEEDLE_MARK, a, b, VALUE_MARK], v, [SEP]]))
        qas.append((np.array([QUERY, NEEDLE_MARK, a, b, VALUE_MARK]), v))
    return recs, qas


def make_sequence(
    task: str, total_len: int, rng: np.random.Generator, n_queries: int = 1, max_records: int | None = None
):
    """One sequence of exactly ``total_len`` tokens:
    ``BOS task [context] q1 a1 q2 a2 ...`` with ``n_queries`` distinct questions
    (passkey has only one).  ``max_records`` caps the number of kv records / needles
    below the documented ranges (for very short training sequences only; evaluation
    samples never set it).  Returns ``(ids int64 [total_len], answer_mask bool
    [total_len], info)`` where ``answer_mask`` marks answer tokens and ``info`` holds
    ``prompt_len`` (tokens before the first answer) and ``record_pos`` (start of the
    record answered first)."""
    _check_task(task)
    recs, qas = _records(task, rng, total_len, max_records)
    n_queries = max(1, min(int(n_queries), len(qas)))
    asked = rng.choice(len(qas), size=n_queries, replace=False)
    tail_len = sum(len(qas[i][0]) + len(qas[i][1]) for i in asked)
    rec_len = sum(len(r) for r in recs)
    n_filler = total_len - HEADER_LEN - rec_len - tail_len
    if n_filler < 0:
        raise ValueError(
            f"{task}: total_len {total_len} too short for {len(recs)} records and "
            f"{n_queries} questions (needs {total_len - n_filler})"
        )
    order = rng.permutation(len(recs))
    # gap before record j (in placement order): sorted uniform cut points of the filler
    cuts = np.sort(rng.integers(0, n_filler + 1, size=len(recs)))
    filler = rng.integers(FILLER_LO, FILLER_HI, size=n_filler)

    ids = np.empty(total_len, dtype=np.int64)
    ids[0], ids[1] = BOS, TASK_TOKEN[task]
    pos, fpos = HEADER_LEN, 0
    record_start = np.empty(len(recs), dtype=np.int64)
    for j, r in enumerate(order):
        g = cuts[j] - fpos
        ids[pos : pos + g] = filler[fpos : cuts[j]]
        pos, fpos = pos + g, cuts[j]
        rec = recs[r]
        ids[pos : pos + len(rec)] = rec
        record_start[r] = pos
        pos += len(rec)
    ids[pos : pos + n_filler - fpos] = filler[fpos:]
    pos += n_filler - fpos

    mask = np.zeros(total_len, dtype=bool)
    prompt_len = None
    for i in asked:
        q, a = qas[i]
        ids[pos : pos + len(q)] = q
        pos += len(q)
        if prompt_len is None:
            prompt_len = pos
        ids[pos : pos + len(a)] = a
        mask[pos : pos + len(a)] = True
        pos += len(a)
    assert pos == total_len
    return ids, mask, {"prompt_len": prompt_len, "record_pos": int(record_start[asked[0]])}


def _rng(seed: int, task: str, context_len: int) -> np.random.Generator:
    # a stable stream per (seed, task, length): crc32, not hash(), which is salted
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(context_len)])


def make_samples(task: str, context_len: int, n: int, seed: int = 0) -> list[Sample]:
    """``n`` evaluation samples of ``task`` whose prompts are exactly ``context_len``
    tokens.  Deterministic for (task, context_len, n, seed): sample i is the same for
    any n > i."""
    _check_task(task)
    if context_len < min_context_len(task):
        raise ValueError(f"context_len must be >= {min_context_len(task)} for {task!r}")
    rng = _rng(seed, task, context_len)
    total = context_len + ANSWER_LEN[task]
    out = []
    for _ in range(n):
        ids, mask, info = make_sequence(task, total, rng, n_queries=1)
        assert info["prompt_len"] == context_len
        t = torch.from_numpy(ids)
        out.append(
            Sample(task, context_len, t[:context_len].clone(), t[context_len:].clone(), info["record_pos"])
        )
    return out


def _device_of(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def generate_answers(model, samples: Sequence[Sample], *, batch_size: int = 8, **generate_kwargs) -> list[torch.Tensor]:
    """Greedy answers (one 1-D LongTensor of ``len(sample.answer)`` ids per sample, on
    the CPU) produced through ``model.generate``.  Samples of equal prompt and answer
    length are batched (all prompts of one context length are, so no padding is ever
    needed)."""
    device = _device_of(model)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((len(s.input_ids), len(s.answer)), []).append(i)
    results: list[torch.Tensor | None] = [None] * len(samples)
    for (plen, alen), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.stack([samples[i].input_ids for i in chunk]).to(device)
            kwargs = dict(
                max_new_tokens=alen,
                do_sample=False,
                num_beams=1,
                pad_token_id=PAD,
            )
            kwargs.update(generate_kwargs)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            new = out[:, plen:].cpu()
            if new.shape[1] < alen:  # generation stopped early (EOS): pad, counts wrong
                new = torch.cat([new, new.new_full((new.shape[0], alen - new.shape[1]), PAD)], 1)
            for row, i in enumerate(chunk):
                results[i] = new[row, :alen]
    return results  # type: ignore[return-value]


def answer_accuracy(model, samples: Sequence[Sample], *, batch_size: int = 8, **generate_kwargs) -> float:
    """Exact-match accuracy of greedy answers generated by ``model.generate`` (a sample
    counts only if every answer token is right)."""
    if not samples:
        raise ValueError("no samples")
    answers = generate_answers(model, samples, batch_size=batch_size, **generate_kwargs)
    correct = sum(bool(torch.equal(a, s.answer)) for a, s in zip(answers, samples))
    return correct / len(samples)


def accuracy_table(
    model,
    tasks: Iterable[str] = TASKS,
    context_lens: Iterable[int] = (1024, 4096),
    n: int = 50,
    seed: int = 1234,
    batch_size: int = 8,
    **generate_kwargs,
) -> dict[str, dict[str, float]]:
    """``{task: {str(context_len): accuracy}}`` over ``n`` samples per cell."""
    table: dict[str, dict[str, float]] = {}
    for task in tasks:
        for L in context_lens:
            acc = answer_accuracy(model, make_samples(task, L, n, seed), batch_size=batch_size, **generate_kwargs)
            table.setdefault(task, {})[str(L)] = acc
            logger.info("accuracy %s @ %d: %.3f (n=%d)", task, L, acc, n)
    return table
