"""Faults through the real stack (uvicorn on 127.0.0.1, models in Ray actors, tiny random models):

- the draft actor killed (SIGKILL) or failing mid-stream: the stream goes on without speculation and its tokens
  equal the undisturbed output; Ray restarts the actor and speculation resumes;
- the target actor killed or hung mid-stream: every in-flight stream ends with an error event and `[DONE]`,
  Ray restarts the actor (a hang is caught by the call watchdog, which kills it), and the server serves again
  with correct output; with no restarts left, /health and new requests answer 503;
- after every fault, no KV slot stays held in either model;
- Ray unreachable at start is a clear error within seconds, not a hang.

Rounds are held with `gated` (a gate on `engine.step`), so each fault lands mid-stream deterministically."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray
from test_server import DEADLINE_S, gated, live, metric_values, sse_events, wait_until
from tiny_folders import write_tiny_folder

from outrider.actors.worker import FAULT_ENV, ModelSource, ModelWorker
from outrider.bench.served import free_port
from outrider.profile import Profile

MAX_TOKENS = 40
WATCHDOG_S = 4.0
BODY = {"prompt": "def fib(n):", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
IDLE = {"target": [0], "draft": 0}
pytestmark = pytest.mark.timeout(180)  # a hang is a failure, never an endless run


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("faults") / "m", seed=1, layers=4)


@pytest.fixture(scope="module")
def cluster():
    os.environ[FAULT_ENV] = "1"  # the placed actors inherit it (see placement._actor)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    del os.environ[FAULT_ENV]


def ray_profile(model: Path, max_restarts: int = 20) -> Profile:
    """Target and draft are the same weights, so a speculating round commits several tokens: whether a round
    drafted shows in the stats."""
    spec = {"model": str(model), "weights": "dense", "dtype": "float32"}
    return Profile.model_validate({
        "name": "faults", "models": {"target": spec, "draft": spec},
        "placement": {"mode": "ray", "target": [{"device": "cpu"}], "draft": [{"device": "cpu"}],
                      "max_restarts": max_restarts, "call_timeout_s": WATCHDOG_S},
        "strategy": {"name": "vanilla", "k": 3},
        "scheduler": {"max_running": 4, "max_queued": 4, "max_tokens": 64, "max_seq_len": 256,
                      "speculation_gate": False},
        "server": {"served_model_name": "tiny"}})


@pytest.fixture(scope="module")
def server(model, cluster):
    with live(ray_profile(model)) as s:
        yield s


@pytest.fixture(scope="module")
def reference(server) -> dict[str, Any]:
    """The undisturbed greedy completion."""
    url, _ = server
    return httpx.post(f"{url}/v1/completions", json=BODY, timeout=DEADLINE_S).json()


def stream(url: str, body: dict[str, Any] = BODY) -> list[dict | str]:
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as c, \
            c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        return list(sse_events(r))


def text_of(events: list[dict | str]) -> str:
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))


def pid_of(actor) -> int:
    return ray.get(actor.info.remote(), timeout=DEADLINE_S)["pid"]


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), f"process {pid} to die")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # reaped between the check and the look
        return False


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=DEADLINE_S)


def wait_healthy(url: str, service) -> None:
    wait_until(lambda: health(url).json()["status"] == "ok", "every actor to be back", timeout=60)
    wait_until(lambda: service.kv_slots_in_use() == IDLE and not service.scheduler.running,
               "no KV slot to stay held")


def counters(url: str) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as c:
        values = metric_values(c)
    return {"failed": values.get(("outrider:request_failure_total", ()), 0),
            **{role: values.get(("outrider:actor_failures_total", (("role", role),)), 0)
               for role in ("target", "draft")}}


def spec_stats(events: list[dict | str]) -> dict[str, Any]:
    return next(e["outrider"] for e in events if isinstance(e, dict) and "outrider" in e)


# -- the draft: losing it never changes the answer ---------------------------------------------------------


@pytest.mark.parametrize("fault", ["sigkill", "raise"])
def test_a_lost_draft_mid_stream_changes_nothing_and_speculation_resumes(server, reference, fault):
    url, service = server
    drafter = service.placed.drafter
    before = counters(url)
    with gated(service, free=2) as gate, ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(stream, url)
        wait_until(gate.holding.is_set, "two rounds to run and the third to be held")
        if fault == "sigkill":
            kill(pid_of(drafter.actor))
        else:
            ray.get(drafter.actor.inject_fault.remote("raise"), timeout=DEADLINE_S)
        gate.open()
        events = streamed.result(timeout=60)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events if isinstance(e, dict))
    assert text_of(events) == reference["choices"][0]["text"]  # identical output without the draft
    assert counters(url) == before | {"draft": before["draft"] + 1}  # no request failed
    stats = spec_stats(events)
    assert stats["rounds"] > stats["drafted_per_position"][0]  # some rounds went without drafts
    wait_healthy(url, service)
    after = stream(url)
    assert text_of(after) == reference["choices"][0]["text"]
    assert spec_stats(after)["accepted_tokens"] > 0  # speculation is back


# -- the target: in-flight requests end with an error, the server recovers ----------------------------------


@pytest.mark.parametrize("fault", ["sigkill", "hang"])
def test_a_lost_target_ends_in_flight_streams_with_an_error_and_the_server_recovers(server, reference, fault):
    url, service = server
    stage = service.placed.target.stages[0]
    before = counters(url)
    with gated(service, free=2) as gate, ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream, url) for _ in range(3)]
        wait_until(lambda: gate.holding.is_set() and len(service.scheduler.running) == 3,
                   "three streams to be running and a round held")
        if fault == "sigkill":
            kill(pid_of(stage))
        else:  # the next round's score never returns: the watchdog must kill the actor
            ray.get(stage.inject_fault.remote("hang"), timeout=DEADLINE_S)
        gate.open()
        results = [s.result(timeout=WATCHDOG_S + 60) for s in streams]
    for events in results:
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == "engine_error" and "target" in error["message"]
    assert counters(url) == before | {"failed": before["failed"] + 3, "target": before["target"] + 1}
    wait_healthy(url, service)
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=DEADLINE_S).json()["choices"] == \
        reference["choices"]


def test_a_target_out_of_restarts_makes_the_server_unavailable(model, cluster):
    with live(ray_profile(model, max_restarts=0)) as (url, service):
        with gated(service, free=1) as gate, ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(stream, url)
            wait_until(gate.holding.is_set, "a round to be held")
            kill(pid_of(service.placed.target.stages[0]))
            gate.open()
            events = streamed.result(timeout=60)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error"
        wait_until(lambda: health(url).status_code == 503, "/health to turn 503")
        assert health(url).json() | {"draft": None} == {"status": "unavailable", "scheduler": "ok",
                                                       "target": "dead", "draft": None}
        r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=DEADLINE_S)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "cannot restart" in r.json()["error"]["message"]


# -- start-up and the hook's guard ---------------------------------------------------------------------------


def test_an_unreachable_ray_cluster_is_a_clear_error_in_seconds(model, tmp_path):
    port = free_port()  # nobody listens on it
    path = tmp_path / "p.yaml"
    path.write_text(ray_profile(model).model_dump_json())  # JSON is YAML
    env = os.environ | {"RAY_ADDRESS": f"127.0.0.1:{port}"}
    done = subprocess.run([sys.executable, "-m", "outrider.cli", "serve", "--profile", str(path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in done.stderr and "ray start --head" in done.stderr


def test_fault_injection_is_refused_without_the_test_switch(model, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    worker = ModelWorker(ModelSource(str(model), "float32", "dense"), 1, 64)
    with pytest.raises(PermissionError, match=FAULT_ENV):
        worker.inject_fault("hang")
