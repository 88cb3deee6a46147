"""Our C++ CPU kernels (`csrc/`): built once per source version and instruction-set level with torch's extension
builder, loaded as torch ops.

Every source is compiled once per level, each with its own -m flags; the compiler's target macros (`csrc/isa.h`)
pick that level's arithmetic, behind the same op names, schemas and weight layout:
- `avx512_amx` (Sapphire Rapids+): `avx512_vnni` plus AMX-INT8 tile multiplies for GGUF matmuls of many rows,
  bitwise the VNNI path's outputs (`csrc/gguf_amx.h`);
- `avx512_vnni` (Zen 4+, Ice Lake+): VPDPBUSD integer dots, 16-lane fp32 vectors;
- `avx2` (Haswell+, Zen 1+; AVX2 + FMA + F16C): VPMADDUBSW integer dots, 8-lane fp32 vectors.
A process loads one library, the best level its CPU runs (`isa()`; OUTRIDER_ISA=avx2 picks a lower one, to compare).

`make venv` builds the CPU's level at install time (`python -m outrider.kernels.native`); a process that finds it
missing builds it on first use (about a minute on 2 cores) under a file lock, so parallel workers build once; a built
library is loaded directly. Build dirs live in $OUTRIDER_HOME/kernels, named by the level and a hash of the sources,
the flags and the torch version, so the levels' builds sit side by side.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))
COMMON_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]  # -fopenmp: at::parallel_for is inline; without it, one thread


@dataclass(frozen=True)
class Level:
    name: str
    cpu_flags: tuple[str, ...]  # as /proc/cpuinfo names them
    cflags: tuple[str, ...]


_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi", "f16c", "fma")
_AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi", "-mf16c",
                 "-mfma")
LEVELS = (  # best first
    # the avx512_vnni build plus gguf_mm's AMX-INT8 tile path, which serves calls of many rows (verify, prefill)
    Level("avx512_amx", _AVX512 + ("amx_tile", "amx_int8"), _AVX512_FLAGS + ("-mamx-tile", "-mamx-int8")),
    Level("avx512_vnni", _AVX512, _AVX512_FLAGS),
    # -ffp-contract=off: every float operation rounds as written, so no fused multiply-add the compiler chose can
    # differ between two instances of a kernel (rows per pass) and break a row's bitwise identity across calls.
    Level("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")),
)
LEVEL_NAMES = tuple(level.name for level in LEVELS)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return frozenset(m.group(1).split()) if m else frozenset()


def _level(name: str) -> Level:
    for level in LEVELS:
        if level.name == name:
            return level
    raise ValueError(f"unknown kernel level {name!r}; choose one of {', '.join(LEVEL_NAMES)}")


def _missing(level: Level) -> list[str]:
    return [f for f in level.cpu_flags if f not in cpu_flags()]


def supported_levels() -> list[str]:
    """The levels this CPU runs, best first."""
    return [level.name for level in LEVELS if not _missing(level)]


def missing_cpu_features() -> list[str]:
    """CPU flags the lowest level needs that this machine lacks (empty when some level of the kernels runs here)."""
    return _missing(LEVELS[-1])


def isa() -> str | None:
    """The level this process runs: OUTRIDER_ISA if set (it must be one the CPU runs), else the best the CPU runs;
    None where none does."""
    forced = os.environ.get("OUTRIDER_ISA")
    if forced:
        lacking = _missing(_level(forced))
        if lacking:
            raise RuntimeError(f"OUTRIDER_ISA={forced} needs CPU flags {', '.join(lacking)}, which this CPU lacks")
        return forced
    levels = supported_levels()
    return levels[0] if levels else None


def _build_name(level: str | None = None) -> str:
    level = level or isa()
    h = hashlib.sha256(torch.__version__.encode())
    for src in SOURCES + HEADERS:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(" ".join(COMMON_CFLAGS + list(_level(level).cflags)).encode())
    return f"outrider_kernels_{level}_{h.hexdigest()[:12]}"


@lru_cache(maxsize=1)
def load() -> None:
    """Build (if needed) and load the kernels of `isa()`; afterwards `torch.ops.outrider.*` (gguf_mm, attention, ...)
    exist."""
    from torch.utils.cpp_extension import load as build

    from outrider.hub import home

    level = isa()
    if level is None:
        raise RuntimeError(f"--weights gguf needs a CPU with {', '.join(missing_cpu_features())} (AVX2 class: "
                           "Haswell+, Zen 1+); use --weights int4 or int8 on this machine")
    name = _build_name(level)
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
                build(name=name, sources=[str(s) for s in SOURCES], extra_cflags=COMMON_CFLAGS + list(
                    _level(level).cflags), extra_ldflags=["-fopenmp"], build_directory=str(directory),
                      is_python_module=False, verbose=False)
    torch.ops.load_library(str(library))
    window = _amx_rows_from_env()
    if window is not None:
        torch.ops.outrider.gguf_amx_rows(*window)
    log.info("loaded native kernels %s (%s)", directory, level)


def _amx_rows_from_env() -> tuple[int, int] | None:
    """OUTRIDER_AMX_ROWS=LEAST:MOST, the row counts gguf_mm's AMX path serves (0: off, to compare); None if unset.
    A malformed value is an error, never a reason to run without the native kernels."""
    value = os.environ.get("OUTRIDER_AMX_ROWS")
    if not value:
        return None
    try:
        least, most = (int(v) for v in value.split(":")) if ":" in value else (int(value), 0)
    except ValueError:
        raise ValueError(f"OUTRIDER_AMX_ROWS={value!r}: give LEAST:MOST (rows) or 0 for never") from None
    if least < 0 or (least > 0 and most < least):
        raise ValueError(f"OUTRIDER_AMX_ROWS={value!r}: need 0 <= LEAST <= MOST")
    return least, most


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether the CPU kernels run here. The model's attention and small ops use them when they do and fall back to
    plain torch when they do not (another CPU, no compiler, or OUTRIDER_NATIVE=0 to compare the two)."""
    if os.environ.get("OUTRIDER_NATIVE", "1") == "0" or missing_cpu_features():
        return False
    _amx_rows_from_env()  # a bad value raises here, outside the build's catch-all below
    try:
        load()
    except Exception as e:  # noqa: BLE001 - a failed build costs speed, not correctness; say so once
        log.warning("native CPU kernels unavailable, using the torch path: %s", e)
        return False
    return True


if __name__ == "__main__":
    chosen = isa()
    if chosen is None:  # install still succeeds; only --weights gguf is unavailable on this CPU
        print(f"native kernels skipped: this CPU lacks {', '.join(missing_cpu_features())}")
    else:
        load()
        print(f"native kernels ready: {_build_name(chosen)}")
