"""A natural-text signal available offline: the Python sources installed packages carry.

Retrieval tasks alone give a model very regular attention: uniform filler, one record to
find. Real LLMs also attend the way text asks (local syntax, identifiers defined far back,
repeated phrases), which shapes their query and key distributions. Every Python
installation carries such text: source code and docstrings of its packages. This module
reads it and tokenizes it with a byte-level tokenizer on top of the task vocabulary:

    0 .. 511     the task tokens of gsa_compile.accuracy.tasks (unchanged)
    512 .. 767  byte b is token TEXT_BYTE0 + b (byte 0 separates source files)

so a model of ``TEXT_VOCAB_SIZE`` ids reads both. ``build_corpus`` writes the bytes of the
``.py`` files under the given roots (in a fixed order, so a machine with the same packages
builds the same corpus) into one file; ``text_rows`` cuts random windows out of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import tasks

logger = logging.getLogger(__name__)

TEXT_BYTE0 = tasks.VOCAB_SIZE
TEXT_VOCAB_SIZE = TEXT_BYTE0 + 256
FILE_SEPARATOR = 0  # the byte between two source files


def encode(data: bytes) -> np.ndarray:
    """Token ids (int64) of ``data``, one per byte."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) + TEXT_BYTE0


def decode(ids: Iterable[int]) -> bytes:
    """The bytes of text token ids; refuses ids outside the byte range."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
    if ids.size and (ids.min() < TEXT_BYTE0 or ids.max() >= TEXT_VOCAB_SIZE):
        raise ValueError(f"text token ids are {TEXT_BYTE0}..{TEXT_VOCAB_SIZE - 1}, got {int(ids.min())}..{int(ids.max())}")
    return (ids - TEXT_BYTE0).astype(np.uint8).tobytes()


def default_roots() -> list[Path]:
    """The site-packages folder of this Python (pure and platform libraries)."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths["purelib"]), Path(paths["platlib"])})


def source_files(roots: Iterable[Path]) -> Iterable[Path]:
    """``.py`` files under ``roots``: each folder's files by name, then its subfolders by name
    (links not followed)."""
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    yield Path(folder) / name


def build_corpus(path: str | Path, max_bytes: int, roots: Optional[Iterable[Path]] = None) -> dict:
    """Write up to ``max_bytes`` bytes of source files (each followed by the separator byte)
    to ``path``; returns ``{"files", "bytes", "sha256", "roots"}``. Files that cannot be
    read or hold the separator byte are skipped."""
    roots = [Path(r) for r in (roots if roots is not None else default_roots())]
    digest, written, files = hashlib.sha256(), 0, 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as out:
        for source in source_files(roots):
            if written >= max_bytes:
                break
            try:
                data = source.read_bytes()
            except OSError:
                continue
            if not data or bytes([FILE_SEPARATOR]) in data:
                continue
            data = data[: max_bytes - written] + bytes([FILE_SEPARATOR])
            out.write(data)
            digest.update(data)
            written += len(data)
            files += 1
    os.replace(tmp, path)
    if written == 0:
        raise FileNotFoundError(f"no readable .py files under {[str(r) for r in roots]}")
    logger.info("text corpus %s: %d files, %d bytes", path, files, written)
    return {"files": files, "bytes": written, "sha256": digest.hexdigest(), "roots": [str(r) for r in roots]}


def load_corpus(path: str | Path) -> np.ndarray:
    """The corpus bytes (uint8, memory-mapped: worker processes share the page cache)."""
    return np.memmap(path, dtype=np.uint8, mode="r")


def text_rows(rng: np.random.Generator, corpus: np.ndarray, length: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` rows of ``length`` tokens: BOS then a window of the corpus at a random
    offset. Returns (ids int64 [batch, length], target mask bool: every token after the
    first byte, i.e. plain next-token prediction)."""
    if len(corpus) < length:
        raise ValueError(f"text corpus has {len(corpus)} bytes, fewer than a row of {length} tokens")
    starts = rng.integers(0, len(corpus) - length + 2, size=batch)
    ids = np.empty((batch, length), dtype=np.int64)
    ids[:, 0] = tasks.BOS
    for row, start in enumerate(starts):
        ids[row, 1:] = corpus[start : start + length - 1].astype(np.int64) + TEXT_BYTE0
    mask = np.zeros((batch, length), dtype=bool)
    mask[:, 2:] = True
    return ids, mask
