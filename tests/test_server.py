"""The OpenAI-compatible server over real HTTP (uvicorn on 127.0.0.1, a free port, in a background thread) with
tiny random models: the official `openai` client works unchanged; streamed text equals non-streamed text;
speculative stats reach the response, the usage chunk and /metrics consistently; a client disconnect aborts the
request and frees its KV; every bad request is a 400/401/404/413/429 with an OpenAI error body, never a hang.

Engine rounds are held with `StepGate` (a threading gate on `engine.step`), so the disconnect and queue-full
tests order events deterministically instead of racing the generation with sleeps."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from tiny_folders import write_tiny_pair

from outrider.bench.served import free_port
from outrider.methods import METHODS
from outrider.profile import Profile
from outrider.server import create_app
from outrider.server.app import StopStrings
from outrider.service import Service

DEADLINE_S = 20.0
MAX_SEQ_LEN = 256
MAX_TOKENS = 64
BODY_LIMIT = 4096
PROMPT = "def fib(n):"


def wait_until(cond: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def make_profile(pair: tuple[Path, Path], **scheduler: Any) -> Profile:
    """Dense fp32 target; the draft is the same weights (so greedy drafts are all accepted and sampled ones
    mostly), with the speculation gate off so every round drafts."""
    target, _ = pair
    spec = {"model": str(target), "weights": "dense", "dtype": "float32"}
    limits = {"max_running": 4, "max_queued": 4, "max_tokens": MAX_TOKENS, "max_seq_len": MAX_SEQ_LEN,
              "speculation_gate": False} | scheduler
    return Profile.model_validate({
        "models": {"target": spec, "draft": spec},
        "placement": {"mode": "local", "target": [{"device": "cpu"}], "draft": [{"device": "cpu"}]},
        "strategy": {"name": "vanilla", "k": 3},
        "scheduler": limits,
        "server": {"served_model_name": "tiny", "max_body_bytes": BODY_LIMIT}})


def wait_serving(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Until the `outrider serve` child answers /health with 200 (failing at once if it exits first)."""
    def healthy() -> bool:
        assert proc.poll() is None, proc.communicate()
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, "`outrider serve` to answer /health", timeout=timeout)


def with_server(profile: Profile, **server: Any) -> Profile:
    return profile.model_copy(update={"server": profile.server.model_copy(update=server)})


@contextmanager
def live(profile: Profile) -> Iterator[tuple[str, Service]]:
    """A started Service behind uvicorn on 127.0.0.1:<free port>; yields (base URL, service)."""
    service = Service.start(profile)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "the server failed to start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


class StepGate:
    """Wraps `engine.step`: the first `free` rounds run, later ones wait (on the engine thread) until `open()`."""

    def __init__(self, step: Callable[..., Any], free: int) -> None:
        self.step, self.free = step, threading.Semaphore(free)
        self.opened, self.holding = threading.Event(), threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.free.acquire(blocking=False):
            self.holding.set()
            self.opened.wait(DEADLINE_S)
        return self.step(*args, **kwargs)

    def open(self) -> None:
        self.opened.set()


@contextmanager
def gated(service: Service, free: int) -> Iterator[StepGate]:
    gate = StepGate(service.engine.step, free)
    service.engine.step = gate
    try:
        yield gate
    finally:
        gate.open()
        del service.engine.step  # back to the class's method


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def server(pair) -> Iterator[tuple[str, Service]]:
    with live(make_profile(pair)) as s:
        yield s


@pytest.fixture()
def url(server) -> str:
    return server[0]


@pytest.fixture()
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as c:
        yield c


@pytest.fixture()
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """Parsed `data:` payloads of an SSE response; the final `[DONE]` as the string."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


def metric_values(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def chat(content: str = "Write a loop.") -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


# -- the official client -----------------------------------------------------------------------------------


def test_openai_client_completions_and_chat(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stats = r.model_extra["outrider"]
    assert stats["rounds"] >= 1 and stats["accepted_tokens"] == sum(stats["accepted_per_position"])
    assert stats["ttft_s"] > 0

    c = client.chat.completions.create(model="tiny", messages=chat(), max_tokens=12, temperature=0)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.usage.completion_tokens >= 1 and c.model_extra["outrider"]["rounds"] >= 1


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_streamed_text_equals_non_streamed(client, sampling):
    kw = dict(model="tiny", max_tokens=40, extra_body={"ignore_eos": True}, **sampling)
    whole = client.completions.create(prompt=PROMPT, **kw)
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"

    whole = client.chat.completions.create(messages=chat(), **kw)
    chunks = list(client.chat.completions.create(messages=chat(), stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["outrider"]["rounds"] == whole.model_extra["outrider"]["rounds"]


def test_include_usage_chunk_carries_speculative_stats(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=chat(), max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20 and last.usage.prompt_tokens > 0
    stats = last.model_extra["outrider"]
    # draft == target: greedy drafts are all accepted, so rounds carry k + 1 tokens (except the clipped last)
    assert stats["accepted_tokens"] > 0 and stats["mean_acceptance_length"] > 1
    assert stats["accepted_tokens"] == sum(stats["accepted_per_position"]) <= stats["draft_tokens"]
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stop_string_truncates_and_ends_the_request(client, server):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[10:13]
    expected = full[:full.find(stop)]
    r = client.completions.create(stop=[stop, "\x00never"], **kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_until(lambda: not server[1].scheduler.running, "the stopped request to be released")


@pytest.mark.parametrize("stops", [["cd"], ["xyz", "bcd"], ["d"], ["zz"], ["fabc", "e"]])
def test_stop_strings_cut_across_piece_boundaries(stops):
    text = "abcdefabcd"
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        matcher = StopStrings(stops)
        out = "".join(matcher.push(p) for p in (text[:i], text[i:j], text[j:])) + matcher.flush()
        assert out == text[:cut] and matcher.hit == (cut < len(text))


def test_models_and_health(http):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == MAX_SEQ_LEN
    assert models["data"][0]["speculation"] == {"strategy": "vanilla", "lossless": True,
                                                "options": {"k": 3, "policy": "fixed"}}
    assert http.get("/health").status_code == 200


def test_metrics_counters_match_the_request(http):
    before = metric_values(http)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0.9, "seed": 3,
                                           "ignore_eos": True})
    stats = r.json()["outrider"]
    after = metric_values(http)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("outrider:spec_decode_num_draft_tokens_total") == stats["draft_tokens"] > 0
    assert delta("outrider:spec_decode_num_accepted_tokens_total") == stats["accepted_tokens"] > 0
    assert delta("outrider:spec_decode_num_drafts_total") == stats["drafted_per_position"][0] > 0
    per_pos = [delta("outrider:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(8)]
    assert per_pos == stats["accepted_per_position"] and sum(per_pos) == stats["accepted_tokens"]
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))  # position i+1 is accepted only after i
    assert delta("outrider:request_success_total", finished_reason="length") == 1
    assert delta("outrider:generation_tokens_total") == 24
    assert delta("outrider:prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"outrider:{hist}_count") == 1
    assert after[("outrider:num_requests_running", ())] == 0 and after[("outrider:num_requests_waiting", ())] == 0


# -- cancellation ------------------------------------------------------------------------------------------


def test_client_disconnect_aborts_and_frees_kv(server, http):
    url, service = server
    baseline = service.kv_slots_in_use()
    aborted = metric_values(http).get(("outrider:request_success_total", (("finished_reason", "abort"),)), 0)
    body = {"messages": chat(), "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0, "stream": True}
    with gated(service, free=2) as gate, httpx.Client(base_url=url, timeout=DEADLINE_S) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = sse_events(r)  # kept: closing a half-read iterator would close the connection here
            first = next(events)
            assert first["choices"][0]["delta"]["role"] == "assistant"
            wait_until(gate.holding.is_set, "two rounds to run and the third to be held")
            assert service.kv_slots_in_use() != baseline  # the request holds KV in both models
        c.close()  # the response was not read to the end: closing drops the connection
        wait_until(lambda: service.scheduler.running and service.scheduler.running[0].cancelled,
                   "the server to notice the disconnect and cancel the request")
        gate.open()
        wait_until(lambda: service.kv_slots_in_use() == baseline and not service.scheduler.running,
                   "the aborted request's KV to be freed")
    key = ("outrider:request_success_total", (("finished_reason", "abort"),))
    assert metric_values(http)[key] == aborted + 1


def test_disconnect_during_a_non_streaming_request_aborts_it(server, http):
    url, service = server
    key = ("outrider:request_success_total", (("finished_reason", "abort"),))
    aborted = metric_values(http).get(key, 0)
    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with gated(service, free=1) as gate:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=DEADLINE_S) as conn:
            conn.sendall(head + body)
            wait_until(gate.holding.is_set, "the request to run one round and be held in the second")
        gate.open()  # the handler sees the closed connection between rounds and cancels the request
        wait_until(lambda: service.kv_slots_in_use() == {"target": [0], "draft": 0}
                   and not service.scheduler.running, "the abandoned request's KV to be freed")
    assert metric_values(http)[key] == aborted + 1


def test_queue_full_is_429_with_retry_after(pair):
    with live(make_profile(pair, max_running=1, max_queued=0)) as (url, service), gated(service, free=0) as gate:
        body = {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "temperature": 0}
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as c, \
                c.stream("POST", "/v1/completions", json=body | {"stream": True}) as held:
            wait_until(gate.holding.is_set, "the first request to be running")
            for extra in ({}, {"stream": True}):
                r = httpx.post(f"{url}/v1/completions", json=body | extra, timeout=DEADLINE_S)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
            gate.open()
            events = list(sse_events(held))
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=DEADLINE_S).status_code == 200


def test_engine_failure_is_an_error_event_and_the_server_keeps_serving(server, http):
    _, service = server
    real = service.engine.step

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device fault")

    service.engine.step = broken
    try:
        with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "stream": True}) as r:
            events = list(sse_events(r))
        assert "simulated device fault" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        r = http.post("/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    finally:
        del service.engine.step
    assert service.engine.step == real
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200
    assert service.kv_slots_in_use() == {"target": [0], "draft": 0}


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, param, says", [
    ({"temperature": -1}, "temperature", "greater than or equal"),
    ({"temperature": 2.5}, "temperature", "less than or equal"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_p": 1.5}, "top_p", "less than or equal"),
    ({"top_k": -2}, "top_k", "greater than or equal"),
    ({"seed": 2**64}, "seed", "less than or equal"),
    ({"max_tokens": None, "prompt": [5] * 240}, None, "max_tokens (16)"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"best_of": 2}, "best_of", "omit best_of or set it to 1"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2"),
    ({"presence_penalty": -3}, "presence_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"99999": 1}}, None, "logit_bias token id 99999 is outside the vocabulary"),
    ({"stop": [""]}, "stop", "empty string"),
    ({"prompt": ["a", 5]}, "prompt", "list of token ids"),
    ({"prompt": []}, "prompt", "non-empty list"),
    ({"prompt": ["a"] * 17}, "prompt", "at most 16 prompts"),
    ({"no_such_field": 1}, "no_such_field", "unknown field"),
    ({"stream_options": {"include_usage": True}}, None, "only allowed with stream"),
    ({"prompt": [5] * 250}, None, f"context limit of {MAX_SEQ_LEN}"),
    ({"max_tokens": MAX_TOKENS + 1}, None, f"limit of {MAX_TOKENS}"),
    ({"prompt": [99999]}, None, "outside the vocabulary"),
    ({"prompt": [5, -1]}, None, "outside the vocabulary"),
    ({"top_k": 1.5}, "top_k", "valid integer"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"max_tokens": 2.5}, "max_tokens", "valid integer"),
], ids=lambda v: str(v)[:40])
def test_invalid_completion_is_400(http, server, change, param, says):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4} | change)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert not server[1].scheduler.running and not server[1].scheduler.waiting


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_sampling_values_are_400(http, server, literal):
    body = f'{{"prompt": "{PROMPT}", "max_tokens": 4, "temperature": {literal}}}'
    r = http.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert not server[1].scheduler.running and not server[1].scheduler.waiting


def test_neutral_openai_fields_are_accepted(http):
    neutral = {"user": "u1", "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "n": 1,
               "best_of": 1, "echo": False, "metadata": {"k": "v"}}
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2} | neutral).status_code == 200
    r = http.post("/v1/chat/completions", json={"messages": chat(), "max_completion_tokens": 2, "logprobs": False,
                                                "tool_choice": "none", "presence_penalty": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_malformed_json_unknown_model_and_route(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = http.post("/v1/completions", json={"model": "gpt-4o", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "tiny" in r.text
    assert http.get("/v1/nothing").json()["error"]["message"] == "Not Found"


def test_oversized_body_is_413(http):
    big = {"prompt": "x" * BODY_LIMIT}
    r = http.post("/v1/completions", json=big)  # rejected by its Content-Length
    assert r.status_code == 413 and str(BODY_LIMIT) in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: rejected while counting
        yield json.dumps(big).encode()[:3000]
        yield json.dumps(big).encode()[3000:]

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_api_key_guards_v1_but_not_health_and_metrics(pair, monkeypatch):
    monkeypatch.setenv("OUTRIDER_TEST_KEY", "s3cret")
    with live(with_server(make_profile(pair), api_key_env="OUTRIDER_TEST_KEY")) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "bearer s3cret"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=DEADLINE_S)
        assert good.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0).usage
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0, timeout=DEADLINE_S)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_cors_only_when_configured(pair, http):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in http.options("/v1/completions", headers=preflight).headers
    with live(with_server(make_profile(pair), cors_origins=["http://ui.example"])) as (url, _):
        r = httpx.options(f"{url}/v1/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        assert "access-control-allow-credentials" not in r.headers


# -- `outrider serve` --------------------------------------------------------------------------------------

SERVE = ("import argparse, sys\nfrom outrider.server.cli import register_cli\n"
         "p = argparse.ArgumentParser(prog='outrider'); register_cli(p.add_subparsers(dest='command', required=True))\n"
         "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def test_serve_command_binds_loopback_from_the_profile(pair, tmp_path):
    target = str(pair[0])
    (tmp_path / "p.yaml").write_text(
        f"models:\n  target: {{model: '{target}', weights: dense, dtype: float32}}\n"
        f"  draft: {{model: '{target}', weights: dense, dtype: float32}}\n"
        "placement: {mode: local, target: [{device: cpu}], draft: [{device: cpu}]}\n"
        f"scheduler: {{max_running: 2, max_seq_len: {MAX_SEQ_LEN}, max_tokens: 8}}\n"
        "server: {api_key_env: OUTRIDER_TEST_UNSET_KEY}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OUTRIDER_TEST_UNSET_KEY"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--profile", str(tmp_path / "p.yaml"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_serving(proc, f"http://127.0.0.1:{port}", timeout=60)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "target"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=DEADLINE_S)
    assert f"http://127.0.0.1:{port}/v1" in out
    assert "OUTRIDER_TEST_UNSET_KEY is not set" in err


@pytest.mark.parametrize("strategy", [{"name": "tree", "k": 4, "branching": 2, "max_nodes": 6},
                                      {"name": "suffix"}, {"name": "multi-draft", "drafts": 3}],
                         ids=["tree", "suffix", "multi-draft"])
def test_tree_strategies_over_http_give_the_plain_text_and_say_so(pair, strategy):
    profile = make_profile(pair)
    tree = profile.model_copy(update={"strategy": METHODS[strategy["name"]].Options(**strategy)})
    plain_profile = profile.model_copy(update={"strategy": METHODS["autoregressive"].Options()})
    prompts = [PROMPT, "def add(a, b):", "class Stack:"]
    texts = {}
    for name, p in (("tree", tree), ("plain", plain_profile)):
        with live(p) as (url, _), httpx.Client(base_url=url, timeout=DEADLINE_S) as http:
            texts[name] = [http.post("/v1/completions", json={"model": "tiny", "prompt": q, "max_tokens": 24,
                                                              "temperature": 0}).json() for q in prompts]
            if name == "tree":
                assert http.get("/v1/models").json()["data"][0]["speculation"]["strategy"] == strategy["name"]
    assert [t["choices"][0]["text"] for t in texts["tree"]] == [t["choices"][0]["text"] for t in texts["plain"]]
    assert sum(t["outrider"]["accepted_tokens"] for t in texts["tree"]) > 0


def test_sampled_requests_over_http_use_the_profiles_multi_draft_and_report_drafts_per_position(pair):
    profile = make_profile(pair)
    options = METHODS["multi-draft"].Options(drafts=3, k=3, sampling="greedy")
    with live(profile.model_copy(update={"strategy": options})) as (url, _), \
            httpx.Client(base_url=url, timeout=DEADLINE_S) as http:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "seed": 5}
        first, second = (http.post("/v1/completions", json=body).json() for _ in range(2))
        bad = http.post("/v1/completions", json=body | {"temperature": -1})
    assert first["choices"][0]["text"] == second["choices"][0]["text"]  # seeded: the same tokens
    stats = first["outrider"]
    assert stats["rounds"] >= 1 and stats["drafts_per_position"][:3] == [3.0, 3.0, 3.0]
    assert bad.status_code == 400
