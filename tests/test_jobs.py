"""`outrider batch` input validation and ordering (fake service, milliseconds), the KubeRay manifests, and
`outrider submit` end to end: a real local Ray cluster with token auth runs the real `outrider batch` on tiny.yaml."""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from outrider import jobs
from outrider.profile import Profile
from outrider.scheduler.engine import SpecStats

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "deploy" / "profiles" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent  # `outrider` and `ray` live beside the interpreter running the tests


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    jobs.register_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# ---------------------------------------------------------------- input validation


def test_bad_lines_are_reported_by_number_before_any_model_loads(tmp_path, monkeypatch):
    from outrider import service

    def no_load(profile):
        raise AssertionError("validation must fail before the models load")

    monkeypatch.setattr(service.Service, "start", classmethod(lambda cls, p: no_load(p)))
    prompts = write_lines(tmp_path / "p.jsonl",
                          '{"prompt": "fine"}',
                          '{"prompt": "unterminated',
                          '{"max_tokens": 4}',
                          '{"prompt": "too long", "max_tokens": 999}',
                          '{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
                          '{"prompt": "x", "temperature": -1}',
                          '{"prompt": "x", "colour": "red"}',
                          '["a list"]')
    args = parse(["batch", "--profile", str(TINY), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")])
    with pytest.raises(ValueError) as err:
        args.func(args)
    msg = str(err.value)
    assert "7 bad input line(s)" in msg and ":1:" not in msg
    assert f"{prompts}:2: not valid JSON" in msg
    assert f"{prompts}:3: give exactly one of \"prompt\"" in msg
    assert f"{prompts}:4: max_tokens 999 is over the profile's scheduler.max_tokens 128" in msg
    assert f"{prompts}:5: give exactly one of" in msg
    assert f"{prompts}:6: temperature must be a finite number >= 0" in msg
    assert f"{prompts}:7: colour: Extra inputs are not permitted" in msg
    assert f"{prompts}:8: expected a JSON object" in msg


def test_empty_input_and_defaults(tmp_path):
    with pytest.raises(ValueError, match="no requests"):
        jobs.read_items(write_lines(tmp_path / "e.jsonl", "", "  "), 128)
    items = jobs.read_items(write_lines(tmp_path / "p.jsonl", "", '{"prompt": "a"}', '{"id": "x", "prompt": "b"}'), 128)
    assert [(i.id, i.max_tokens, i.sampling().greedy) for i in items] == [(2, 128, True), ("x", 128, True)]


# ---------------------------------------------------------------- batch over a fake service


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeService:
    """Echoes the prompt's first max_tokens ids; later requests finish first, so results arrive out of order."""

    def __init__(self) -> None:
        self.tokenizer, self.in_flight, self.peak, self.running = FakeTokenizer(), 0, 0, False

    async def __aenter__(self):
        self.running = True
        return self

    async def __aexit__(self, *exc) -> None:
        self.running = False

    async def complete(self, prompt_ids, max_tokens, params, stop_ids=None):
        assert self.running, "complete() outside `async with svc`"
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.02 / len(prompt_ids))
        self.in_flight -= 1
        if prompt_ids == [ord("!")]:
            raise ValueError("prompt refused")
        ids = prompt_ids[:max_tokens]
        return SimpleNamespace(text="".join(map(chr, ids)), token_ids=ids, finish_reason="length",
                               stats=SpecStats(new_tokens=len(ids)), ttft_s=0.001, seconds=0.002)


def test_run_batch_keeps_input_order_bounds_concurrency_and_survives_a_bad_request(tmp_path, capsys):
    lines = [json.dumps({"prompt": "p" * n, "max_tokens": 3}) for n in range(1, 9)]
    lines.insert(2, json.dumps({"id": "bad", "prompt": "!"}))
    lines.append(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}))
    items = jobs.read_items(write_lines(tmp_path / "p.jsonl", *lines), 128)
    out, svc = io.StringIO(), FakeService()
    failed = asyncio.run(jobs.run_batch(svc, items, out, concurrency=3, emit=True))

    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert failed == 1 and svc.peak == 3
    assert [r["id"] for r in rows] == [1, 2, "bad", 4, 5, 6, 7, 8, 9, "chat"]
    assert rows[2] == {"id": "bad", "error": "ValueError: prompt refused"}
    assert rows[0]["text"] == "p" and rows[5]["token_ids"] == [ord("p")] * 3 and rows[-1]["text"] == "<user>"
    assert rows[0]["stats"]["new_tokens"] == 1 and "mean_acceptance_length" in rows[0]["stats"]
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == f"{jobs.PROGRESS} done=10 total=10"
    assert jobs.collect_results(stdout, len(items)) == rows  # what `submit` rebuilds from the job log


def test_collect_results_names_missing_results():
    with pytest.raises(RuntimeError, match="holds 1 of 2 results"):
        jobs.collect_results(f'{jobs.RESULT} {{"index": 1, "id": 1}}\n', 2)


def test_log_follower_handles_lines_split_across_chunks():
    f = jobs.LogFollower(10, "t", echo=False)
    for chunk in ["noise\noutrider-prog", "ress done=4 total=10\n", "outrider-progress done=7 total=10\n"]:
        f.feed(chunk)
    assert f.bar.n == 7
    f.bar.close()


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert jobs.find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.find_token().value == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.find_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.find_token() == jobs.ClusterToken("from-env", "$RAY_AUTH_TOKEN")
    assert jobs.find_token("flag").source == "--token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH=.*missing is not a file"):
        jobs.find_token()


def test_entrypoint_is_one_shell_line():
    # --remote-command is shell words (`python -m outrider.cli`), so a path with a space arrives quoted.
    assert jobs.entrypoint("'/opt/my env/bin/python' -m outrider.cli", 4).endswith(
        "; exec '/opt/my env/bin/python' -m outrider.cli batch --profile profile.yaml --input prompts.jsonl "
        "--output results.jsonl --emit-results --concurrency 4")


def test_a_head_without_outrider_on_its_path_gets_an_error_naming_the_fix(tmp_path):
    """What the job runs on a head started without the venv activated: the check, not `sh: outrider: not found`."""
    env = {"PATH": "/usr/bin:/bin"}  # a shell, and no outrider
    done = subprocess.run(["sh", "-c", jobs.entrypoint("outrider", None)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 127
    assert "outrider is not found on the Ray head (its PATH is /usr/bin:/bin)" in done.stderr
    assert "--remote-command /path/to/.venv/bin/outrider" in done.stderr
    # with the program found, the line runs it with the staged files
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "outrider").write_text('#!/bin/sh\necho "ran: $*"\n')
    (fake / "outrider").chmod(0o755)
    done = subprocess.run(["sh", "-c", jobs.entrypoint("outrider", 2)], env={"PATH": f"{fake}:/usr/bin:/bin"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == (
        "ran: batch --profile profile.yaml --input prompts.jsonl --output results.jsonl --emit-results "
        "--concurrency 2")


# ---------------------------------------------------------------- KubeRay manifests


def test_kuberay_manifests_parse_and_carry_valid_profiles():
    for name, kind in (("rayjob.yaml", "RayJob"), ("raycluster-serve.yaml", "RayCluster")):
        docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kuberay" / name).read_text()) if d]
        by_kind = {d["kind"]: d for d in docs}
        assert kind in by_kind and "ConfigMap" in by_kind, name
        for key, text in by_kind["ConfigMap"]["data"].items():
            if key.endswith(".yaml"):
                Profile.model_validate(yaml.safe_load(text))  # the profile the pods mount is a valid profile
        spec = by_kind[kind]["spec"]
        cluster = spec.get("rayClusterSpec", spec)
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                assert container["resources"]["requests"] and container["resources"]["limits"], name
    job = yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert any("outrider batch" in (d or {}).get("spec", {}).get("entrypoint", "") for d in job)


# ---------------------------------------------------------------- a real Ray cluster


def free_ports(n: int) -> list[int]:
    """Ports in 20000-29999: outside Ray's worker range (10002-19999) and the kernel's ephemeral range."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Stop this test's cluster only (`ray stop --force` would kill every Ray process on the machine): the
    processes that name its temp dir or GCS port, and their children."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and (temp_dir in cmd or f":{gcs_port} " in f"{cmd} "):
            roots.append(p)
    procs = set(roots)
    for p in roots:
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        p.kill()


def wait_for_job_server(address: str, token: str, deadline: float) -> None:
    import requests

    while True:
        try:
            if requests.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"},
                            timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"the job server at {address} did not come up"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head():
    """A one-node cluster with token auth and the dashboard (the Job API lives there), on unique ports and its
    own temp dir so a leftover cluster can neither break it nor be touched by its teardown."""
    temp_dir = tempfile.mkdtemp(prefix="ordr-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `outrider` resolves here
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--num-cpus", "2", "--include-dashboard", "true",
           "--disable-usage-stats", "--temp-dir", f"{temp_dir}/r", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr)]
    address = f"http://127.0.0.1:{dash}"
    try:
        started = subprocess.run(cmd, env=env, cwd=temp_dir, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stderr[-3000:]
        wait_for_job_server(address, token, time.monotonic() + 30)
        yield SimpleNamespace(address=address, token=token, env=env)
    finally:
        stop_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


PROMPTS = ('{"id": "first", "prompt": "def add(a, b):", "max_tokens": 12}',
           '{"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}',
           '{"id": "third", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0.8, "seed": 3}')


def check_rows(rows: list[dict]) -> None:
    assert [r["id"] for r in rows] == ["first", 2, "third"]
    for r in rows:
        assert r["token_ids"] and r["finish_reason"] in ("length", "stop") and isinstance(r["text"], str), r
        assert r["stats"]["new_tokens"] == len(r["token_ids"])


def test_submit_runs_outrider_batch_on_a_ray_cluster_with_token_auth(ray_head, tmp_path, monkeypatch):
    prompts, out = write_lines(tmp_path / "prompts.jsonl", *PROMPTS), tmp_path / "results.jsonl"
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of this machine's own
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="requires a token and none was found: pass --token"):
        jobs.submit_batch(ray_head.address, TINY, prompts, out)
    with pytest.raises(RuntimeError, match="rejected the token from --token"):
        jobs.submit_batch(ray_head.address, TINY, prompts, out, token="not-the-token")

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    t0 = time.monotonic()
    assert jobs.submit_batch(ray_head.address, TINY, prompts, out, timeout=90, echo=False) == 0
    print(f"outrider submit: {time.monotonic() - t0:.1f}s")
    check_rows([json.loads(x) for x in out.read_text().splitlines()])


def test_ray_job_submit_cli_runs_outrider_batch(ray_head, tmp_path):
    """The documented `ray job submit -- outrider batch ...` path (docs/multinode.md)."""
    stage = tmp_path / "job"
    stage.mkdir()
    shutil.copy(TINY, stage / "profile.yaml")
    write_lines(stage / "prompts.jsonl", *PROMPTS)
    env = {**ray_head.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head.token}  # Ray's CLI needs both
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address, "--working-dir", str(stage),
           "--", "outrider", "batch", "--profile", "profile.yaml", "--input", "prompts.jsonl",
           "--output", "results.jsonl", "--emit-results"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_rows(jobs.collect_results(done.stdout, 3))
