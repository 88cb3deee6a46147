"""`outrider serve` as a child process on 127.0.0.1, for load runs and tests that need the real server: started
on a free port, ready when /health says 200 (bounded by a deadline), stopped with SIGTERM and killed if it does
not exit."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import httpx

from outrider.actors.transport import free_port  # noqa: F401  (tests and bench import it from here)

START_TIMEOUT_S = 180.0  # model load on a cold page cache, real checkpoints
STOP_TIMEOUT_S = 30.0  # uvicorn's graceful shutdown after SIGTERM, then SIGKILL


@contextmanager
def served(profile: str | Path, start_timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """`outrider serve --profile P` on 127.0.0.1:<free port> as a child process; yields its base URL once
    /health says 200. Stopped with SIGTERM (uvicorn's graceful shutdown), killed if it has not exited in
    STOP_TIMEOUT_S."""
    port = free_port()
    cmd = [sys.executable, "-m", "outrider.cli", "serve", "--profile", str(profile), "--host", "127.0.0.1",
           "--port", str(port)]
    # Its output goes to a file, not a pipe: nobody reads while it serves, and a full pipe would block it.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log, start_timeout_s)
            yield url
        finally:
            _stop(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, log: IO[str], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"`outrider serve` exited with {proc.returncode} before /health:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"`outrider serve` did not answer /health within {timeout_s:.0f}s:\n{_tail(log)}")


def _tail(log: IO[str], chars: int = 2000) -> str:
    log.seek(0)
    return log.read()[-chars:]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM; a no-op when it already exited
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)
