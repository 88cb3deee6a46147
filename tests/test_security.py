"""Security: what a profile or a request can make the server load or run.

No unsafe deserialization: nothing in `outrider/` can turn bytes into arbitrary Python objects — no pickle
family import, no eval/exec, no yaml loader that builds objects, no `torch.load` without `weights_only=True`, no
`recv_pyobj`. Ray pickles what our own processes send each other (actor arguments); that is between processes we
started, never a client's bytes, and lives in Ray, not in this source tree.

Secure defaults: the server binds loopback and sends no CORS headers unless told to, every shipped profile
keeps that, the local Ray cluster starts without its dashboard, and the API key never reaches a log line.
"""
from __future__ import annotations

import ast
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
import uvicorn
from test_server import make_profile, wait_until, with_server
from tiny_folders import write_tiny_pair

from outrider.profile import PROFILES_DIR, Profile, load_profile

SOURCE = Path(__file__).resolve().parent.parent / "outrider"
LOOPBACK = ("127.0.0.1", "::1", "localhost")

# --- no unsafe deserialization: the static scan --------------------------------------------------------------------

PICKLE_FAMILY = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "jsonpickle"}
# yaml names that construct arbitrary Python objects; yaml.load/load_all are fine only with a SafeLoader.
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader",
               "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}
# (path relative to the repo, finding) -> why it is safe. Empty: nothing in outrider/ needs an exception today.
# An entry must say why the bytes it reads can only come from this process or a file the operator chose.
ALLOWED: dict[tuple[str, str], str] = {}


class UnsafeCalls(ast.NodeVisitor):
    """Collects `line: what` for every unsafe-deserialization construct in one module."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> dotted origin (`np` -> `numpy`, `load` -> `torch.load`)
        self.safe_loaders = set(SAFE_YAML_LOADERS)

    def flag(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{node.lineno}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            if a.name.split(".")[0] in PICKLE_FAMILY:
                self.flag(node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{module}.{a.name}"
            if module.split(".")[0] in PICKLE_FAMILY:
                self.flag(node, f"from {module} import {a.name}")
            elif module == "yaml" and a.name in UNSAFE_YAML:
                self.flag(node, f"from yaml import {a.name}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        # A SafeLoader subclass (profile.py's duplicate-key loader) stays safe: it only adds checks.
        if any(self.dotted(b) in self.safe_loaders for b in node.bases):
            self.safe_loaders.add(node.name)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if self.dotted(node) in {f"yaml.{n}" for n in UNSAFE_YAML - {"load", "load_all"}}:
            self.flag(node, self.dotted(node))  # named at all (a base class, an argument): it builds objects
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec"):
            self.flag(node, f"{name}()")
        elif name in ("yaml.load", "yaml.load_all") and self.dotted(kwargs.get("Loader")) not in self.safe_loaders:
            self.flag(node, f"{name}() without a SafeLoader")
        elif name == "torch.load" and not is_true(kwargs.get("weights_only")):
            self.flag(node, "torch.load() without weights_only=True")
        elif name == "numpy.load" and is_true(kwargs.get("allow_pickle")):
            self.flag(node, "numpy.load(allow_pickle=True)")
        elif name.endswith("recv_pyobj"):
            self.flag(node, name)
        self.generic_visit(node)

    def dotted(self, node: ast.AST | None) -> str:
        """`np.load` -> `numpy.load` through the module's imports; "" for anything but names and attributes."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else ""
        return ""


def is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    finder = UnsafeCalls()
    finder.visit(ast.parse(source))
    return finder.found


def test_no_unsafe_deserialization_in_the_source():
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        rel = str(path.relative_to(SOURCE.parent))
        found += [f"{rel}:{f}" for f in unsafe_calls(path.read_text(encoding="utf-8"))
                  if (rel, f.split(": ", 1)[1]) not in ALLOWED]
    assert found == [], ("unsafe deserialization (pickle, torch.load without weights_only, yaml.load: a file could "
                         "run code):\n" + "\n".join(found))


def test_the_scan_catches_every_unsafe_form():
    """The negative control: a scan that finds nothing must be because there is nothing."""
    bad = """
import pickle
import numpy as np
import torch as t
import yaml
from marshal import loads
from yaml import unsafe_load
class L(yaml.FullLoader): pass
pickle.loads(b"")
eval("1"); exec("x = 1")
t.load("w.pt"); t.load("w.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
yaml.load(text); yaml.load(text, Loader=yaml.Loader); yaml.unsafe_load(text)
sock.recv_pyobj()
"""
    found = [f.split(": ", 1)[1] for f in unsafe_calls(bad)]
    for what in ("import pickle", "from marshal import loads", "from yaml import unsafe_load", "yaml.FullLoader",
                 "eval()", "exec()", "yaml.load() without a SafeLoader", "yaml.Loader", "yaml.unsafe_load",
                 "numpy.load(allow_pickle=True)", "sock.recv_pyobj"):
        assert what in found, what
    assert found.count("torch.load() without weights_only=True") == 2


def test_the_scan_passes_safe_forms():
    good = """
import json, yaml, torch, numpy
class Strict(yaml.SafeLoader): pass
yaml.safe_load(text); yaml.load(text, Loader=yaml.SafeLoader); yaml.load(text, Loader=Strict); Strict(text)
torch.load("w.pt", weights_only=True); numpy.load("a.npy"); json.loads("{}")
model.eval(); engine.exec_round()
"""
    assert unsafe_calls(good) == []


# --- secure defaults --------------------------------------------------------------------------------------------

def test_profile_defaults_bind_loopback_without_cors():
    minimal = {"models": {"target": {"model": "any"}}, "strategy": {"name": "autoregressive"}}
    server = Profile.model_validate(minimal).server
    assert server.host == "127.0.0.1" and server.cors_origins == []


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_bind_loopback_without_cors(path):
    server = load_profile(path).server
    if server.host not in LOOPBACK:  # an exposed host is allowed only with the reason on its line
        line = next(line for line in path.read_text().splitlines() if re.match(r"\s*host:", line))
        assert "#" in line, f"{path.name}: host {server.host} without a comment saying why it is not loopback"
    assert server.cors_origins == [], f"{path.name}: CORS origins {server.cors_origins}"


def test_local_ray_cluster_starts_without_a_dashboard(monkeypatch):
    """What we ask of `ray.init` is the behaviour under test, so ray.init itself is replaced by a recorder."""
    import ray

    from outrider.actors import placement

    calls: list[dict[str, Any]] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    placement.connect()
    (kwargs,) = calls
    assert kwargs["include_dashboard"] is False or kwargs.get("dashboard_host") in LOOPBACK, kwargs


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.mark.timeout(120)
def test_serve_listens_on_loopback_only(pair, tmp_path):
    """The real command, no --host, a profile without a server section: every listening socket is loopback."""
    target = pair[0]
    profile = tmp_path / "p.yaml"
    profile.write_text(f"models:\n  target: {{model: '{target}', weights: dense, dtype: float32}}\n"
                       "placement: {mode: local, target: [{device: cpu}]}\nstrategy: {name: autoregressive}\n"
                       "scheduler: {max_running: 1, max_seq_len: 64, max_tokens: 4}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "outrider.cli", "serve", "--profile", str(profile), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server = psutil.Process(proc.pid)
        listening = wait_until(lambda: [c.laddr for c in server.net_connections("inet") if c.status == "LISTEN"],
                               "`outrider serve` to listen", timeout=60)
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@contextmanager
def logged_server(profile: Profile) -> Iterator[str]:
    """Like test_server.live, but uvicorn logs at debug with access lines, into the root logger (caplog): the
    most a server operator would switch on short of `trace`, which is a deliberate dump of the wire."""
    from outrider.server import create_app
    from outrider.service import Service

    service = Service.start(profile)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(service), log_config=None, log_level="debug", access_log=True,
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        service.shutdown()


@pytest.mark.timeout(120)
def test_api_key_never_reaches_the_logs(pair, monkeypatch, caplog, capfd):
    key, wrong = f"sk-{uuid.uuid4().hex}", f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("OUTRIDER_SECURITY_TEST_KEY", key)
    caplog.set_level(logging.DEBUG)
    profile = with_server(make_profile(pair), api_key_env="OUTRIDER_SECURITY_TEST_KEY")
    with logged_server(profile) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": "tiny", "prompt": "def f():", "max_tokens": 2}
        for auth in (None, f"Bearer {wrong}", f"bearer {key}", key):
            r = http.post("/v1/completions", json=body, headers={"Authorization": auth} if auth else {})
            assert r.status_code == 401 and key not in r.text and wrong not in r.text
        r = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        r = http.post("/v1/completions", json=body | {"max_tokens": 10**6}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400  # an error path logs too
    server_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # the client's
    assert any(r.name == "uvicorn.access" for r in server_records)  # the log under test was really on
    text = "\n".join(r.getMessage() for r in server_records) + "".join(capfd.readouterr())
    assert key not in text and wrong not in text
    assert "OUTRIDER_SECURITY_TEST_KEY" in os.environ  # still set: the server read it, and kept it out of the logs
