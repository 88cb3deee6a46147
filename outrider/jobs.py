"""Batch jobs: `outrider batch` runs a JSONL file of prompts through one Service; `outrider submit` runs that same
command on a Ray cluster as a Ray job and brings the results back.

A Ray job's working directory is temporary and may sit on another machine, so the one channel back to the
submitter is the job's log. `batch --emit-results` therefore prints protocol lines that `submit` parses:

    outrider-progress done=3 total=10
    outrider-result {"index": 2, "id": ..., "text": ..., "token_ids": [...], "finish_reason": ..., "stats": {...}}

Authentication (Ray token mode, 2.52+; read from the installed 2.60): the job server wants the header
`Authorization: Bearer <token>`. Ray's own client adds it only when RAY_AUTH_MODE=token is set in the *client's*
environment, so `submit` finds the token itself (--token, then where Ray looks: $RAY_AUTH_TOKEN, the file at
$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and always sends the header; a cluster without token auth ignores it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROGRESS = "outrider-progress"
RESULT = "outrider-result"
DEFAULT_MAX_TOKENS = 128
MAX_REPORTED_PROBLEMS = 20
# Names inside the job's working directory (the staged copy of the user's files).
STAGED_PROFILE, STAGED_INPUT, STAGED_OUTPUT = "profile.yaml", "prompts.jsonl", "results.jsonl"


# ---------------------------------------------------------------- input


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: str
    content: str


class BatchItem(BaseModel):
    """One input line. `id` defaults to the line number so every result traces back to its line."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str | int
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> BatchItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" (raw text) or "messages" (a chat list)')
        self.sampling()  # SamplingParams names a bad temperature / top_p / top_k
        return self

    def sampling(self):
        from outrider.scheduler.sampling import SamplingParams

        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


def parse_item(line: str, lineno: int, max_tokens_limit: int) -> BatchItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object like {{\"prompt\": \"...\"}}, got a {type(obj).__name__}")
    try:
        item = BatchItem(**{"id": lineno, **obj})
    except ValidationError as e:
        raise ValueError(_describe(e)) from None
    if item.max_tokens > max_tokens_limit:
        raise ValueError(f"max_tokens {item.max_tokens} is over the profile's scheduler.max_tokens "
                         f"{max_tokens_limit}: lower it, or raise scheduler.max_tokens in the profile")
    return item


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def read_items(path: str | Path, max_tokens_limit: int) -> list[BatchItem]:
    """Every line validated before any model loads; all bad lines are reported at once, by line number."""
    items, problems = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are spacing, not requests
            try:
                items.append(parse_item(line, lineno, max_tokens_limit))
            except ValueError as e:
                problems.append(f"{path}:{lineno}: {e}")
    if problems:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        tail = [f"... and {more} more"] if more > 0 else []
        raise ValueError(f"{len(problems)} bad input line(s); fix them and rerun:\n"
                         + "\n".join(problems[:MAX_REPORTED_PROBLEMS] + tail))
    if not items:
        raise ValueError(f"{path}: no requests; write one JSON object per line, e.g. {{\"prompt\": \"def fib(n):\"}}")
    return items


# ---------------------------------------------------------------- batch


def print_progress(done: int, total: int) -> None:
    print(f"{PROGRESS} done={done} total={total}", flush=True)


@dataclass
class OrderedSink:
    """Takes results as they finish (any order) and writes them in input order."""

    out: TextIO
    total: int
    emit: bool  # also print each result as a protocol line (for `submit`)
    pending: dict[int, dict] = field(default_factory=dict)
    written: int = 0
    done: int = 0
    failed: int = 0

    def add(self, index: int, row: dict) -> None:
        self.done += 1
        self.failed += "error" in row
        if self.emit:
            # One write per line: the job log interleaves our stdout with Ray's worker logs line by line.
            sys.stdout.write(f"{RESULT} {json.dumps({'index': index, **row})}\n")
        self.pending[index] = row
        while self.written in self.pending:
            self.out.write(json.dumps(self.pending.pop(self.written)) + "\n")
            self.written += 1
        self.out.flush()
        print_progress(self.done, self.total)


async def complete_one(svc, item: BatchItem) -> dict:
    try:
        text = item.prompt
        if item.messages is not None:
            text = svc.tokenizer.apply_chat_template([m.model_dump() for m in item.messages])
        c = await svc.complete(svc.tokenizer.encode(text), item.max_tokens, item.sampling())
    except Exception as e:  # one bad request (prompt too long, template refused) must not sink the batch
        return {"id": item.id, "error": f"{type(e).__name__}: {e}"}
    return {"id": item.id, "text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
            "stats": {**c.stats.as_dict(), "ttft_s": c.ttft_s, "seconds": c.seconds}}


async def run_batch(svc, items: list[BatchItem], out: TextIO, concurrency: int, emit: bool = False) -> int:
    """At most `concurrency` requests in flight (the Service batches them); returns how many failed."""
    sink = OrderedSink(out, len(items), emit)
    queue = iter(enumerate(items))

    async def worker() -> None:
        for index, item in queue:  # workers share one iterator: each takes the next request when it is free
            sink.add(index, await complete_one(svc, item))

    async with svc:  # runs the service's scheduler loop for the duration of the batch
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    return sink.failed


def cmd_batch(a: argparse.Namespace) -> int:
    from outrider.profile import load_profile

    profile = load_profile(a.profile)
    items = read_items(a.input, profile.scheduler.max_tokens)
    concurrency = profile.scheduler.max_running if a.concurrency is None else a.concurrency
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    with open(a.output, "w", encoding="utf-8") as out:  # opened first: an unwritable path fails before loading
        print_progress(0, len(items))
        from outrider.service import Service

        svc = Service.start(profile)
        try:
            failed = asyncio.run(run_batch(svc, items, out, concurrency, a.emit_results))
        finally:
            svc.shutdown()
    print(f"outrider batch: {len(items) - failed}/{len(items)} requests completed, results in {a.output}",
          file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------- submit


@dataclass(frozen=True)
class ClusterToken:
    value: str
    source: str  # where it was found, for error messages


def find_token(explicit: str | None = None) -> ClusterToken | None:
    """--token, else the places Ray 2.60's loader reads, in its order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH's
    file, ~/.ray/auth_token."""
    if explicit:
        return ClusterToken(explicit.strip(), "--token")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return ClusterToken(os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        if not path.is_file():
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} is not a file: point it at the cluster's token file")
        return ClusterToken(path.read_text().strip(), str(path))
    path = Path.home() / ".ray" / "auth_token"
    return ClusterToken(path.read_text().strip(), str(path)) if path.is_file() else None


def auth_help(address: str, token: ClusterToken | None) -> str:
    where = ("pass --token TOKEN, set RAY_AUTH_TOKEN, or copy the head's ~/.ray/auth_token to ~/.ray/auth_token "
             "here (print it on the head with `ray get-auth-token`)")
    if token is None:
        return f"the Ray cluster at {address} requires a token and none was found: {where}"
    return f"the Ray cluster at {address} rejected the token from {token.source}: {where}"


class JobClient:
    """JobSubmissionClient with our token header and errors that say what to do."""

    def __init__(self, address: str, token: ClusterToken | None) -> None:
        self.address, self.token = address, token
        headers = {"Authorization": f"Bearer {token.value}"} if token else None
        self.sdk = self.call(_make_client, address, headers)

    def call(self, fn, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError:
            raise RuntimeError(auth_help(self.address, self.token)) from None
        except ConnectionError:
            raise RuntimeError(f"no Ray job server answers at {self.address}: give the head's dashboard address "
                               "(http://HEAD:8265 by default); the head must run the dashboard "
                               "(`ray start --head --include-dashboard true`, needs ray[default])") from None


def _make_client(address: str, headers: dict | None):
    from ray.job_submission import JobSubmissionClient

    # Ray's client lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address it is given, and reads an
    # address without a scheme as a GCS address; --address is explicit (its default already reads the env).
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address if "://" in address else f"http://{address}", headers=headers)
    finally:
        os.environ.update(saved)


def entrypoint(remote_command: str, concurrency: int | None) -> str:
    """The job's shell line: check that the head can run `remote_command`'s program, then run `outrider batch`.
    A head started without outrider's environment on its PATH would otherwise fail inside the job with
    `sh: outrider: not found`, which names neither the cause nor the fix."""
    words = shlex.split(remote_command)
    args = [*words, "batch", "--profile", STAGED_PROFILE, "--input", STAGED_INPUT, "--output", STAGED_OUTPUT,
            "--emit-results"]
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    program = shlex.quote(words[0])
    before = f"outrider submit: {words[0]} is not found on the Ray head (its PATH is "
    after = ("). Start the head from the environment outrider is installed in (`source .venv/bin/activate && ray "
             "start --head ...`), or give its full path: "
             "`outrider submit --remote-command /path/to/.venv/bin/outrider`")
    message = f'{shlex.quote(before)}"$PATH"{shlex.quote(after)}'  # quoted: only $PATH is expanded
    return f"command -v {program} >/dev/null 2>&1 || {{ echo {message} >&2; exit 127; }}; exec {shlex.join(args)}"


def submit_job(client: JobClient, profile: Path, prompts: Path, command: str, concurrency: int | None,
               ship_code: bool) -> str:
    """Stage the profile and prompts as the job's working_dir (Ray uploads it) and submit; returns the job id."""
    with tempfile.TemporaryDirectory(prefix="outrider-job-") as stage:
        shutil.copy(profile, Path(stage) / STAGED_PROFILE)
        shutil.copy(prompts, Path(stage) / STAGED_INPUT)
        runtime_env: dict = {"working_dir": stage}
        if ship_code:  # this checkout's outrider package shadows the cluster's (its dependencies must be there)
            runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
        return client.call(client.sdk.submit_job, entrypoint=entrypoint(command, concurrency),
                           runtime_env=runtime_env, submission_id=f"outrider-batch-{uuid.uuid4().hex[:8]}",
                           metadata={"outrider": "batch"})


class LogFollower:
    """Turns the job's log stream into progress-bar updates; other lines are echoed (model loading, tracebacks)."""

    def __init__(self, total: int, label: str, echo: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", desc=label, file=sys.stderr, dynamic_ncols=True)
        self.echo, self.partial = echo, ""

    def feed(self, chunk: str) -> None:
        *lines, self.partial = (self.partial + chunk).split("\n")  # a chunk may end mid-line
        for line in lines:
            self.line(line)

    def line(self, line: str) -> None:
        if line.startswith(PROGRESS):
            fields = dict(kv.split("=", 1) for kv in line.split()[1:])
            self.bar.update(int(fields["done"]) - self.bar.n)
        elif self.echo and not line.startswith(RESULT):
            self.bar.write(line, file=sys.stderr)


async def watch(client: JobClient, job_id: str, follower: LogFollower):
    """Follow the logs until the job ends; returns its terminal JobStatus."""
    async for chunk in client.sdk.tail_job_logs(job_id):
        follower.feed(chunk)
    # The log stream closes when the job ends; the status may lag behind it by a moment.
    while not (status := await asyncio.to_thread(client.call, client.sdk.get_job_status, job_id)).is_terminal():
        await asyncio.sleep(0.5)
    return status


def collect_results(logs: str, total: int) -> list[dict]:
    rows = {}
    for line in logs.splitlines():
        if line.startswith(RESULT + " "):
            row = json.loads(line[len(RESULT) + 1:])
            rows[row.pop("index")] = row
    missing = [i for i in range(total) if i not in rows]
    if missing:
        raise RuntimeError(f"the job's log holds {len(rows)} of {total} results (first missing: line index "
                           f"{missing[0]}); was the cluster's outrider too old to know --emit-results?")
    return [rows[i] for i in range(total)]


def write_results(path: str | Path, rows: list[dict]) -> None:
    tmp = Path(f"{path}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)  # a reader never sees half a file


def failure_report(client: JobClient, job_id: str, status, lines: int = 30) -> str:
    # Ray's message repeats the log tail after its first line; ours drops the protocol lines.
    message = (client.call(client.sdk.get_job_info, job_id).message or "").split("\n")[0]
    logs = client.call(client.sdk.get_job_logs, job_id).splitlines()
    tail = [x for x in logs if not x.startswith((RESULT, PROGRESS))][-lines:]
    return (f"job {job_id} {status.value}: {message}\n--- last log lines (full log: "
            f"`ray job logs {job_id} --address {client.address}`) ---\n" + "\n".join(tail))


def submit_batch(address: str, profile: str | Path, prompts: str | Path, output: str | Path, *,
                 token: str | None = None, timeout: float | None = None, concurrency: int | None = None,
                 remote_command: str = "outrider", ship_code: bool = False, echo: bool = True) -> int:
    """Run `outrider batch` on the cluster and write its results to `output`; returns the exit code."""
    from outrider.profile import load_profile

    items = read_items(prompts, load_profile(profile).scheduler.max_tokens)  # fail here, not on the cluster
    client = JobClient(address, find_token(token))
    job_id = submit_job(client, Path(profile), Path(prompts), remote_command, concurrency, ship_code)
    print(f"outrider submit: job {job_id} submitted to {address}", file=sys.stderr)
    follower = LogFollower(len(items), job_id, echo)
    try:
        status = asyncio.run(asyncio.wait_for(watch(client, job_id, follower), timeout))
    except (KeyboardInterrupt, asyncio.TimeoutError) as e:
        follower.bar.close()
        client.call(client.sdk.stop_job, job_id)  # never leave a batch running on the cluster unattended
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"still running after --timeout {timeout}s"
        print(f"outrider submit: job {job_id} {why}; stopped it", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    follower.bar.close()
    if status.value != "SUCCEEDED":
        print(failure_report(client, job_id, status), file=sys.stderr)
        return 1
    rows = collect_results(client.call(client.sdk.get_job_logs, job_id), len(items))
    write_results(output, rows)
    failed = sum("error" in r for r in rows)
    print(f"outrider submit: {len(rows) - failed}/{len(rows)} requests completed, results in {output}",
          file=sys.stderr)
    return 1 if failed else 0


def cmd_submit(a: argparse.Namespace) -> int:
    return submit_batch(a.address, a.profile, a.input, a.output, token=a.token, timeout=a.timeout,
                        concurrency=a.concurrency, remote_command=a.remote_command, ship_code=a.ship_code,
                        echo=not a.quiet)


# ---------------------------------------------------------------- CLI


def _add_io_args(p: argparse.ArgumentParser) -> None:
    from outrider.profile import DEFAULT_PROFILE

    p.add_argument("--profile", default=str(DEFAULT_PROFILE), help="deployment profile (YAML)")
    p.add_argument("--input", required=True, help='JSONL, one request a line: {"prompt": ...} or {"messages": [...]}'
                   ', optional "id", "max_tokens", "temperature", "top_p", "top_k", "seed"')
    p.add_argument("--output", required=True, help="JSONL results, one a line, in input order")
    p.add_argument("--concurrency", type=int, help="requests in flight (default: the profile's max_running)")


def register_cli(subparsers) -> None:
    b = subparsers.add_parser("batch", help="run a JSONL file of prompts through the profile's service")
    _add_io_args(b)
    b.add_argument("--emit-results", action="store_true",
                   help=f"also print each result as a `{RESULT} {{json}}` line (how `submit` reads them back)")
    b.set_defaults(func=cmd_batch)

    s = subparsers.add_parser("submit", help="run `outrider batch` on a Ray cluster as a Ray job")
    _add_io_args(s)
    s.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                   help="the head's job server (dashboard) address (default: $RAY_API_SERVER_ADDRESS or "
                        "http://127.0.0.1:8265)")
    s.add_argument("--token", help="cluster token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                                   "~/.ray/auth_token); prefer those: a flag shows in `ps`")
    s.add_argument("--timeout", type=float, help="stop the job after this many seconds")
    s.add_argument("--remote-command", default="outrider",
                   help="how the cluster runs outrider (e.g. `/opt/venv/bin/outrider`, `python -m outrider.cli`)")
    s.add_argument("--ship-code", action="store_true",
                   help="upload this outrider package with the job (the cluster still needs its dependencies)")
    s.add_argument("--quiet", action="store_true", help="show only the progress bar, not the job's log")
    s.set_defaults(func=cmd_submit)

