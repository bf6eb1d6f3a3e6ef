"""Small C libraries built on first use with the machine's C compiler, cached per user.

The onnxruntime custom-op shim and the CPU kernels' popcount scoring are a few lines of C each;
they are compiled from their source strings into the user cache ($GSA_COMPILE_CACHE, else
$XDG_CACHE_HOME/gsa_compile, else ~/.cache/gsa_compile), one file per (source, flags, machine),
and loaded with ctypes. No build step at install time, no headers beyond the C standard ones."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Sequence


class NativeUnavailable(RuntimeError):
    """A native library cannot be built or loaded here (no C compiler, or it failed)."""


def cache_dir() -> str:
    return os.environ.get("GSA_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gsa_compile")


def _cpu_features() -> "str | None":
    """The processor's feature flags (Linux /proc/cpuinfo), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if found is None:
        raise NativeUnavailable("no C compiler found (cc, gcc or clang; or set CC)")
    return found


def build_library(name: str, source: str, flags: Sequence[str] = ("-O2",), for_this_cpu: bool = False) -> str:
    """Path of the shared library compiled from `source` (built once; later calls find it).
    for_this_cpu: also use every instruction set extension of this processor (-march=native,
    where the processor's features can be read so that they key the cached file: a cache shared
    with another machine then never hands it code its processor lacks)."""
    features = _cpu_features() if for_this_cpu else None
    if features is not None:
        flags = [*flags, "-march=native"]
    key = "\0".join([source, *flags, platform.machine(), features or ""])
    path = os.path.join(cache_dir(), f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    cc = compiler()
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        source_file, built = os.path.join(work, f"{name}.c"), os.path.join(work, f"{name}.so")
        with open(source_file, "w") as handle:
            handle.write(source)
        result = subprocess.run([cc, "-shared", "-fPIC", *flags, "-o", built, source_file],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeUnavailable(f"{cc} could not build {name}: {result.stderr.strip()[:300]}")
        os.replace(built, path)  # atomic: a concurrent builder finds a whole file or none
    return path
