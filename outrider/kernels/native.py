"""Our C++ CPU kernels (`csrc/`): built once per source version with torch's extension builder, loaded as torch ops.

`make venv` builds them at install time (`python -m outrider.kernels.native`); a process that finds them missing
builds them on first use (about a minute on 2 cores) under a file lock, so parallel workers build once; a built
library is loaded directly.
The build dir lives in $OUTRIDER_HOME/kernels, keyed by a hash of the sources and the torch version.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))
# Zen 4/5 and Ice Lake+ have all of these; `cpu_supported` checks before anything is built or run.
ISA_FLAGS = ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi", "f16c", "fma"]
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi", "-mf16c",
          "-mfma", "-fno-math-errno", "-fopenmp"]  # -fopenmp: at::parallel_for is inline; without it, one thread


def missing_cpu_features() -> list[str]:
    """CPU flags the kernels need that this machine lacks (empty when it can run them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ISA_FLAGS
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in ISA_FLAGS if f not in have]


def _build_name() -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return f"outrider_kernels_{h.hexdigest()[:12]}"


@lru_cache(maxsize=1)
def load() -> None:
    """Build (if needed) and load the kernels; afterwards `torch.ops.outrider.*` (gguf_mm, attention, ...) exist."""
    missing = missing_cpu_features()
    if missing:
        raise RuntimeError(f"--weights gguf needs a CPU with {', '.join(missing)} (AVX512-VNNI class: Zen 4+, "
                           "Ice Lake+); use --weights int4 or int8 on this machine")
    from torch.utils.cpp_extension import load as build

    from outrider.hub import home

    name = _build_name()
    directory = home() / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{name}.so"
    if not library.exists():
        # torch's builder guards its directory with a lock *file* that a process killed mid-load (a worker stopped
        # by a fault, a test killing an actor) leaves behind, and every later build or load then waits on it
        # forever. So: build only under an flock, which dies with its holder, clearing torch's stale file first,
        # and load a built library directly, with no lock at all.
        with open(directory / "build.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if not library.exists():
                (directory / "lock").unlink(missing_ok=True)
                build(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                      build_directory=str(directory), is_python_module=False, verbose=False)
    torch.ops.load_library(str(library))
    log.info("loaded native kernels %s", directory)


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether the CPU kernels run here. The model's attention and small ops use them when they do and fall back to
    plain torch when they do not (another CPU, no compiler, or OUTRIDER_NATIVE=0 to compare the two)."""
    if os.environ.get("OUTRIDER_NATIVE", "1") == "0" or missing_cpu_features():
        return False
    try:
        load()
    except Exception as e:  # noqa: BLE001 - a failed build costs speed, not correctness; say so once
        log.warning("native CPU kernels unavailable, using the torch path: %s", e)
        return False
    return True


if __name__ == "__main__":
    lacking = missing_cpu_features()
    if lacking:  # install still succeeds; only --weights gguf is unavailable on this CPU
        print(f"native kernels skipped: this CPU lacks {', '.join(lacking)}")
    else:
        load()
        print(f"native kernels ready: {_build_name()}")
