"""The head-dim-128 accuracy model: its config, the byte-level text corpus, and training that
resumes across calls exactly where it stopped (tiny sizes, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gsa_compile.accuracy import model as acc_model
from gsa_compile.accuracy import tasks as T
from gsa_compile.accuracy import text as TXT

ROOT = Path(__file__).resolve().parents[2]


def _trainer():
    spec = importlib.util.spec_from_file_location("train_accuracy_model", ROOT / "benchmarks/accuracy/train_accuracy_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_geometry128_has_llm_attention_geometry_and_stays_small():
    cfg = acc_model.accuracy_model_config("geometry128")
    assert cfg.head_dim == 128 and cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 2
    assert cfg.num_hidden_layers >= 12
    assert cfg.vocab_size == TXT.TEXT_VOCAB_SIZE > T.VOCAB_SIZE
    with torch.device("meta"):
        model = acc_model.build_accuracy_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert params * 2 <= 50 * 2**20  # bf16
    assert model.model.layers[0].self_attn.q_proj.out_features == 8 * 128 != cfg.hidden_size
    with pytest.raises(ValueError, match="geometry128"):
        acc_model.accuracy_model_config("geometry64")


def test_byte_tokens_round_trip_and_sit_above_the_task_vocabulary():
    data = "déf f(x):\n    return x  # ok\n".encode()
    ids = TXT.encode(data)
    assert ids.min() >= T.VOCAB_SIZE and ids.max() < TXT.TEXT_VOCAB_SIZE
    assert TXT.decode(ids) == data
    with pytest.raises(ValueError, match="512"):
        TXT.decode([T.BOS])


def _sources(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    for name in ("b/mod.py", "a/x.py", "a/y.txt", "c.py"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\n" + "def f():\n    return 1\n" * 20)
    return root


def test_corpus_is_sorted_python_sources_with_separators_and_is_reproducible(tmp_path):
    root = _sources(tmp_path)
    stats = TXT.build_corpus(tmp_path / "c1.bin", 1 << 20, [root])
    again = TXT.build_corpus(tmp_path / "c2.bin", 1 << 20, [root])
    assert stats == again and stats["files"] == 3
    corpus = bytes(TXT.load_corpus(tmp_path / "c1.bin"))
    parts = corpus.split(b"\x00")
    assert [p.split(b"\n")[0] for p in parts[:-1]] == [b"# c.py", b"# a/x.py", b"# b/mod.py"]
    capped = TXT.build_corpus(tmp_path / "c3.bin", 100, [root])
    assert capped["bytes"] == 101 and capped["files"] == 1  # the cap, then the separator
    ids, mask = TXT.text_rows(np.random.default_rng(0), TXT.load_corpus(tmp_path / "c1.bin"), 64, 3)
    assert ids.shape == (3, 64) and (ids[:, 0] == T.BOS).all() and (ids[:, 1:] >= TXT.TEXT_BYTE0).all()
    assert not mask[:, :2].any() and mask[:, 2:].all()


TINY = "geometry128,num_hidden_layers=1,hidden_size=32,intermediate_size=64,head_dim=16"


def _run(trainer, out: Path, roots: Path, *extra: str) -> None:
    args = ["--model", TINY, "--out-dir", str(out), "--time-budget", "1e6", "--min-len", "64", "--max-len", "128",
            "--tokens-per-batch", "256", "--workers", "0", "--prefetch", "1", "--text-frac", "0.5",
            "--text-roots", str(roots), "--eval-lens", "", "--warmup-steps", "3", "--log-every", "100",
            "--shard-size", "20KB", "--save-every", "0", "--resume", *extra]
    assert trainer.main(args) == 0


def _weights(out: Path) -> dict:
    return torch.load(out / "ckpt" / "checkpoint.pt", weights_only=False)["model"]


def test_training_resumed_across_calls_equals_one_uninterrupted_run(tmp_path):
    trainer = _trainer()
    roots = _sources(tmp_path)
    _run(trainer, tmp_path / "whole", roots, "--max-steps", "4")
    _run(trainer, tmp_path / "split", roots, "--max-steps", "2")
    _run(trainer, tmp_path / "split", roots, "--max-steps", "4")
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert all(torch.equal(whole[name], split[name]) for name in whole)
    state = json.loads((tmp_path / "split" / "trainer_state.json").read_text())
    assert state["step"] == 4 and [call["start"] for call in state["calls"]] == ["fresh", "full"]
    assert state["text_tokens"] > 0 and state["answer_tokens"] > 0
    # the bf16 weights are shards with an index, and load as the model
    assert len(list((tmp_path / "split").glob("model-*.safetensors"))) > 1
    loaded = acc_model.load_accuracy_model(tmp_path / "split")
    assert torch.allclose(loaded.model.norm.weight, whole["model.norm.weight"].to(torch.bfloat16).float())

    # a fresh machine has only the portable state: the weights resume, the AdamW moments restart
    for path in (tmp_path / "split" / "ckpt").glob("checkpoint.pt"):
        path.unlink()
    _run(trainer, tmp_path / "split", roots, "--max-steps", "5")
    state = json.loads((tmp_path / "split" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["warm_from"] == 4 and state["calls"][-1]["start"] == "weights"

    with pytest.raises(ValueError, match="model_spec"):
        _run(trainer, tmp_path / "split", roots, "--max-steps", "6", "--model", TINY.replace("hidden_size=32", "hidden_size=48"))


def test_text_rows_need_the_byte_vocabulary(tmp_path):
    trainer = _trainer()
    with pytest.raises(ValueError, match="geometry128"):
        trainer.main(["--out-dir", str(tmp_path), "--text-frac", "0.5", "--model", "num_hidden_layers=1", "--max-steps", "1"])
