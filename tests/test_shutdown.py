"""Graceful shutdown of a real `outrider serve` process with its models in Ray actors:

- SIGTERM with a drain time: the in-flight stream finishes normally, the process exits 0 in bounded time and
  leaves no process behind (actors, raylet, GCS);
- SIGTERM with `shutdown_timeout_s: 0`: the in-flight stream ends at once with an error event and `[DONE]`,
  and the process exits within seconds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
from test_server import sse_events, wait_serving
from tiny_folders import write_tiny_folder

from outrider.bench.served import free_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("shutdown") / "m", seed=1, layers=4)


def serve(model: Path, tmp_path: Path, drain_s: float) -> tuple[subprocess.Popen, str]:
    spec = {"model": str(model), "weights": "dense", "dtype": "float32"}
    profile = {"name": "shutdown", "models": {"target": spec, "draft": spec},
               "placement": {"mode": "ray", "target": [{"device": "cpu"}], "draft": [{"device": "cpu"}]},
               "scheduler": {"max_running": 2, "max_tokens": 200, "max_seq_len": 256, "speculation_gate": False},
               "server": {"shutdown_timeout_s": drain_s}}
    path = tmp_path / "profile.yaml"
    path.write_text(json.dumps(profile))  # JSON is YAML
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    proc = subprocess.Popen([sys.executable, "-m", "outrider.cli", "serve", "--profile", str(path), "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_serving(proc, url, timeout=120)
    return proc, url


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def stream_after_sigterm(proc: subprocess.Popen, url: str, max_tokens: int) -> Iterator[dict | str]:
    """Start a stream, send SIGTERM once its first chunk has arrived, then read the rest."""
    body = {"prompt": "def fib(n):", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
        yield next(events)
        proc.send_signal(signal.SIGTERM)
        yield from events


def ray_processes() -> set[str]:
    """The processes a served Ray deployment runs under the server: the cluster's own and both model actors."""
    from outrider.actors.worker import DraftWorker, ModelWorker

    return {"gcs_server", "raylet", f"ray::{ModelWorker.__name__}", f"ray::{DraftWorker.__name__}"}


def still_there(children: list[psutil.Process]) -> list[str]:
    listed = []
    for p in children:
        try:
            listed.append(f"{p.pid} {p.name()} ({p.status()})")
        except psutil.NoSuchProcess:
            pass
    return listed


def assert_exits_clean(proc: subprocess.Popen, children: list[psutil.Process], within_s: float) -> tuple[str, str]:
    """Wait for the server to exit (the bound only stops a hang; reading its output as it waits keeps a full pipe
    from stalling it) and for every child it had to be gone; returns its stdout and stderr."""
    try:
        out, err = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server had not exited {within_s:.0f}s after the stream ended; its children: "
                    f"{still_there(children)}")
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left behind: {still_there(alive)}"
    return out, err


def test_sigterm_lets_the_in_flight_stream_finish_and_leaves_nothing_running(model, tmp_path):
    proc, url = serve(model, tmp_path, drain_s=30)
    try:
        children = descendants(proc)
        assert children, "the Ray cluster and actors run as children of the server"
        # "nothing left running" below covers what matters only if those processes are among the watched
        assert ray_processes() <= {p.name() for p in children}, still_there(children)
        events = list(stream_after_sigterm(proc, url, max_tokens=150))
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        out, err = assert_exits_clean(proc, children, within_s=60)
        assert proc.returncode == 0, err
        assert out.startswith("outrider: serving ") and "Traceback" not in err, (out, err)
    finally:
        proc.kill()


def test_sigterm_without_drain_time_ends_the_stream_with_an_error_at_once(model, tmp_path):
    proc, url = serve(model, tmp_path, drain_s=0)
    try:
        children = descendants(proc)
        assert ray_processes() <= {p.name() for p in children}, still_there(children)
        events = list(stream_after_sigterm(proc, url, max_tokens=200))
        assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
        out, err = assert_exits_clean(proc, children, within_s=30)
        assert proc.returncode == 0, err
        assert out.startswith("outrider: serving ") and "Traceback" not in err, (out, err)
    finally:
        proc.kill()
