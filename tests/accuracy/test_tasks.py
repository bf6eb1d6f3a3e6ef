"""Synthetic long-context tasks, the scorer and the committed accuracy model (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsa_compile.accuracy import model as acc_model
from gsa_compile.accuracy import tasks as T


@pytest.mark.parametrize("task", T.TASKS)
def test_deterministic_for_a_seed(task):
    a = T.make_samples(task, 512, 4, seed=3)
    b = T.make_samples(task, 512, 4, seed=3)
    c = T.make_samples(task, 512, 4, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.answer, y.answer)
    assert not all(torch.equal(x.input_ids, z.input_ids) for x, z in zip(a, c))
    # a prefix of a longer draw is the same samples
    longer = T.make_samples(task, 512, 6, seed=3)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, longer))


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("context_len", [256, 1000, 4096])
def test_layout_and_answer_position(task, context_len):
    for s in T.make_samples(task, context_len, 5, seed=11):
        ids, ans = s.input_ids, s.answer
        assert ids.dtype == torch.long and ids.dim() == 1 and len(ids) == context_len == s.context_len
        assert ans.dtype == torch.long and len(ans) == T.ANSWER_LEN[task]
        assert s.task == task
        assert ids[0] == T.BOS and ids[1] == T.TASK_TOKEN[task]
        assert int(ids.max()) < T.VOCAB_SIZE and int(ids.min()) >= 0
        assert not (ids == T.PAD).any() and not (ids == T.EOS).any()
        # answers are digits
        assert ((ans >= T.DIGIT0) & (ans < T.DIGIT0 + 10)).all()
        # the prompt ends with QUERY + the record's prefix; the record in the context
        # continues with the answer
        qlen = T.QUESTION_LEN[task]
        question = ids[-qlen:]
        assert question[0] == T.QUERY
        prefix = question[1:]
        p = s.answer_record_pos
        assert torch.equal(ids[p : p + len(prefix)], prefix)
        assert torch.equal(ids[p + len(prefix) : p + len(prefix) + len(ans)], ans)
        # that prefix occurs exactly once in the context (the answer is unambiguous)
        ctx = ids[:-qlen].tolist()
        pre = prefix.tolist()
        hits = [i for i in range(len(ctx) - len(pre) + 1) if ctx[i : i + len(pre)] == pre]
        assert hits == [p]
        marks = {"passkey": T.PASSKEY_MARK, "kv": T.KEY_MARK, "needle": T.NEEDLE_MARK}
        n_records = int((ids[:-qlen] == marks[task]).sum())
        if task == "passkey":
            assert n_records == 1
        elif task == "kv":
            assert T.KV_PAIRS[0] <= n_records <= T.KV_PAIRS[1]
            keys = ids[:-qlen][torch.nonzero(ids[:-qlen] == T.KEY_MARK).flatten() + 1]
            assert len(set(keys.tolist())) == n_records  # distinct keys
        else:
            assert T.NEEDLE_COUNT[0] <= n_records <= T.NEEDLE_COUNT[1]
            starts = torch.nonzero(ids[:-qlen] == T.NEEDLE_MARK).flatten()
            names = [(int(ids[i + 1]), int(ids[i + 2])) for i in starts]
            assert len(set(names)) == len(names)
            # distractors are similar: the asked needle shares a name symbol with another
            asked = (int(prefix[1]), int(prefix[2]))
            assert any(n != asked and (n[0] == asked[0] or n[1] == asked[1]) for n in names)


def test_training_sequence_with_several_questions():
    rng = np.random.default_rng(0)
    ids, mask, info = T.make_sequence("kv", 1024, rng, n_queries=5)
    assert ids.shape == mask.shape == (1024,)
    assert mask.sum() == 5 * T.KV_VALUE_DIGITS
    assert int((ids == T.QUERY).sum()) == 5
    # the first question has exactly the evaluation layout
    assert not mask[: info["prompt_len"]].any() and mask[info["prompt_len"]]
    with pytest.raises(ValueError):
        T.make_samples("kv", 64, 1)
    with pytest.raises(ValueError):
        T.make_samples("nope", 1024, 1)


class _Oracle(torch.nn.Module):
    """Answers through ``generate`` from a table (or a wrong one, shifted by one)."""

    def __init__(self, samples, wrong_every: int = 0):
        super().__init__()
        self.table = {tuple(s.input_ids.tolist()): s.answer for s in samples}
        self.wrong_every = wrong_every
        self.calls = []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, **kw):
        self.calls.append((tuple(input_ids.shape), max_new_tokens, kw.get("do_sample")))
        rows = []
        for r in input_ids:
            ans = self.table[tuple(r.tolist())].clone()
            if self.wrong_every and hash(tuple(r.tolist())) % self.wrong_every == 0:
                ans[-1] = T.DIGIT0 + (int(ans[-1]) - T.DIGIT0 + 1) % 10
            rows.append(torch.cat([r, ans[:max_new_tokens]]))
        return torch.stack(rows)


def _mixed_samples():
    return (
        T.make_samples("passkey", 300, 5, seed=1)
        + T.make_samples("kv", 300, 4, seed=1)
        + T.make_samples("needle", 400, 3, seed=1)
    )


def test_scorer_right_and_wrong():
    samples = _mixed_samples()
    right = _Oracle(samples)
    assert T.answer_accuracy(right, samples, batch_size=2) == 1.0
    # greedy, batched by (prompt length, answer length), asking exactly the answer length
    assert all(c[2] is False for c in right.calls)
    assert {(c[0][1], c[1]) for c in right.calls} == {(300, 5), (300, 3), (400, 4)}
    assert max(c[0][0] for c in right.calls) == 2
    wrong = _Oracle(samples, wrong_every=1)  # last digit off by one everywhere
    assert T.answer_accuracy(wrong, samples) == 0.0
    ans = T.generate_answers(right, samples)
    assert all(torch.equal(a, s.answer) for a, s in zip(ans, samples))


def test_scorer_partial_and_early_stop():
    samples = T.make_samples("passkey", 300, 4, seed=2)

    class Short(_Oracle):
        def generate(self, input_ids, attention_mask=None, max_new_tokens=1, **kw):
            out = super().generate(input_ids, attention_mask, max_new_tokens, **kw)
            return out[:, :-2]  # stopped early (e.g. emitted EOS)

    assert T.answer_accuracy(Short(samples), samples) == 0.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_builds_saves_loads(tmp_path, attn):
    tiny = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    m = acc_model.build_accuracy_model(seed=0, attn_implementation=attn, **tiny)
    cfg = m.config
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 2 and cfg.head_dim == 64
    assert cfg.vocab_size == T.VOCAB_SIZE
    acc_model.save_accuracy_model(m, tmp_path)
    r = acc_model.load_accuracy_model(tmp_path, attn_implementation=attn)
    assert r.config._attn_implementation == attn
    assert not r.training and next(r.parameters()).dtype == torch.float32
    for (n, p), (n2, q) in zip(m.named_parameters(), r.named_parameters()):
        assert n == n2 and torch.equal(p.to(torch.bfloat16).float(), q)
    samples = T.make_samples("kv", 256, 2, seed=0)
    acc = T.answer_accuracy(r, samples)
    assert 0.0 <= acc <= 1.0


def test_missing_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        acc_model.load_accuracy_model(tmp_path)


COMMITTED = (acc_model.ASSET_DIR / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not COMMITTED, reason="accuracy model weights not committed yet")
def test_committed_model_is_accurate():
    m = acc_model.load_accuracy_model(attn_implementation="sdpa")
    cfg = m.config
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 2 and cfg.head_dim == 64
    assert cfg.num_hidden_layers == 6 and cfg.vocab_size == T.VOCAB_SIZE
    samples = []
    for task in T.TASKS:
        samples += T.make_samples(task, 1024, 3, seed=99)
        samples += T.make_samples(task, 2048, 1, seed=99)
    acc = T.answer_accuracy(m, samples, batch_size=4)
    assert acc >= 0.9, acc


@pytest.mark.skipif(not COMMITTED, reason="accuracy model weights not committed yet")
def test_committed_model_eager_matches_sdpa():
    samples = [T.make_samples(task, 512, 1, seed=7)[0] for task in T.TASKS]
    eager = T.generate_answers(acc_model.load_accuracy_model(attn_implementation="eager"), samples)
    sdpa = T.generate_answers(acc_model.load_accuracy_model(attn_implementation="sdpa"), samples)
    assert all(torch.equal(a, b) for a, b in zip(eager, sdpa))
    assert sum(torch.equal(a, s.answer) for a, s in zip(eager, samples)) >= 2
