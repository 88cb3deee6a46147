"""`outrider bench load`: bounded HTTP load against `outrider serve`, with every stream checked token by token.

Each of `--distinct` request specs (seeded: prompt length, max_tokens, greedy or seeded sampling, chat or
completions, some with a stop string) is sent once non-streamed with `return_token_ids`: that is its reference.
Then `--requests` streamed requests cycle through the specs, `--concurrency` at a time. A stream passes when it
is a 200 whose events all parse, with no error event, a finish chunk, a usage chunk and then `data: [DONE]`, and
whose text and token ids equal the reference's, as many as its usage counts.

Token integrity, over completed streams (a stream's ids against its reference's, as multisets):
  lost          reference tokens the stream never delivered
  duplicated    tokens delivered more often than the reference has them
  out_of_order  positions that differ in a stream holding exactly the reference's tokens
Latency is client-side, as `vllm bench serve` measures it: TTFT from sending to the first chunk carrying
tokens; TPOT = (last token chunk − first token chunk) / (tokens − 1); E2E from sending to `[DONE]`.
Every loop has a count bound and the whole run one wall-clock deadline (`--deadline`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import httpx

from outrider.bench.served import served
from outrider.scheduler.policy import MAX_DRAFT

DEFAULT_REQUESTS = 1000
DEFAULT_CONCURRENCY = 16
CHAT_OVERHEAD = 64  # tokens a chat template may add around the messages (a default system prompt, markers)
PROMPT_CAP = 1024  # characters: keeps prompts "mixed", not context-filling, on long-context models
READ_TIMEOUT_S = 120.0  # one silent gap this long fails the request even with deadline left
WORDS = ("def", "return", "value", "list", "sort", "index", "the", "loop", "while", "print", "count", "node",
         "graph", "cache", "token", "model", "draft", "verify", "accept", "stream", "merge", "split", "key", "map")
STOPS = ("\n\n", " the", "e", ");")

T = TypeVar("T")


def add_load_args(p: argparse.ArgumentParser) -> None:
    """Load-only options; --profile, --requests, --concurrency, --seed and --max-tokens are shared."""
    p.add_argument("--url", default=None, help="load: a running server's base URL (else --profile starts one)")
    p.add_argument("--distinct", type=int, default=50, help="load: distinct request specs the requests cycle")
    p.add_argument("--deadline", type=float, default=1800.0, help="load: wall-clock bound of the whole run (s)")


@dataclass(frozen=True)
class LoadOptions:
    requests: int = DEFAULT_REQUESTS
    concurrency: int = DEFAULT_CONCURRENCY
    distinct: int = 50
    seed: int = 0
    max_tokens: int = 64  # cap on a spec's max_tokens (the server's own limit must allow it)
    deadline_s: float = 1800.0

    def __post_init__(self) -> None:
        if min(self.requests, self.concurrency, self.distinct, self.max_tokens) < 1 or self.deadline_s <= 0:
            raise ValueError(f"--requests, --concurrency, --distinct and --max-tokens must be >= 1 and --deadline "
                             f"> 0, got {self.requests}, {self.concurrency}, {self.distinct}, {self.max_tokens}, "
                             f"{self.deadline_s}")


# -- request specs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One distinct request; `body` is the same for its reference and its streams but for streaming."""

    chat: bool
    prompt: str
    max_tokens: int
    seed: int | None  # None: greedy
    stop: str | None
    ignore_eos: bool

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "ignore_eos": self.ignore_eos,
                                "return_token_ids": True}
        body |= {"messages": [{"role": "user", "content": self.prompt}]} if self.chat else {"prompt": self.prompt}
        body |= {"temperature": 0} if self.seed is None else {"temperature": 0.8, "seed": self.seed}
        if self.stop is not None:
            body["stop"] = [self.stop]
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body


def make_specs(rng: random.Random, n: int, max_model_len: int, cap: int) -> list[Spec]:
    """Mixed lengths that fit the context. Prompts are ASCII, so their token count is at most their length in
    characters; the server reserves MAX_DRAFT + 1 verify rows past prompt + max_tokens."""
    room = max_model_len - MAX_DRAFT - 1 - CHAT_OVERHEAD
    if room < 8:
        raise ValueError(f"the server's max_model_len ({max_model_len}) leaves no room for a prompt and 4 tokens")
    specs = []
    for _ in range(n):
        max_tokens = rng.randint(4, max(4, min(cap, room // 2)))
        length = rng.randint(4, min(PROMPT_CAP, room - max_tokens))
        prompt = " ".join(rng.choice(WORDS) for _ in range(length))[:length]
        seed = rng.randrange(2**31) if rng.random() < 0.5 else None
        stop = rng.choice(STOPS) if rng.random() < 0.2 else None
        specs.append(Spec(rng.random() < 0.5, prompt, max_tokens, seed, stop, rng.random() < 0.5))
    return specs


# -- one stream --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    text: str
    token_ids: list[int]


@dataclass
class Stream:
    """What one streamed request showed the client; `failure` names the first protocol violation."""

    spec: int
    sent_at: float
    failure: str | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    usage_tokens: int | None = None
    done_at: float | None = None  # `[DONE]` arrived
    first_at: float | None = None  # first chunk carrying tokens
    last_at: float | None = None  # last chunk carrying tokens

    @property
    def verdict(self) -> str | None:
        """None for a stream that ended properly, else why not."""
        return self.failure or (None if self.done_at is not None else "no_done")

    def record(self, payload: str, now: float) -> None:
        """One `data:` payload, in order; the first violation sticks."""
        if self.failure is None:
            self.failure = self._check(payload, now)

    def _check(self, payload: str, now: float) -> str | None:
        if self.done_at is not None:
            return "event_after_done"
        if payload == "[DONE]":
            self.done_at = now
            return None if self.finished and self.usage_tokens is not None else "done_before_finish"
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            return "bad_event"
        if "error" in obj:
            return "error_event"
        if not obj.get("choices"):  # the usage chunk: after the finish, once
            if not self.finished or "usage" not in obj:
                return "misplaced_usage"
            self.usage_tokens = obj["usage"]["completion_tokens"]
            return None
        return self._choice(obj["choices"][0], now)

    def _choice(self, choice: dict[str, Any], now: float) -> str | None:
        if self.finished:
            return "chunk_after_finish"
        delta = choice.get("delta", {})
        text = choice["text"] if "text" in choice else delta.get("content") or ""
        ids = choice.get("token_ids")
        if ids is None:  # only a chat role chunk may come without ids
            return None if "role" in delta and not text else "missing_token_ids"
        self.text += text
        self.token_ids += ids
        if ids:
            self.first_at = self.first_at or now
            self.last_at = now
        self.finished = choice.get("finish_reason") is not None
        return None


async def sse_payloads(response: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each SSE event (multi-line data joined by newlines); an `event: error` frame yields an
    error object so that the check sees it whatever its data says."""
    data: list[str] = []
    name = ""
    async for line in response.aiter_lines():
        if line == "":  # the blank line ends an event
            if name == "error":
                yield json.dumps({"error": "\n".join(data)})
            elif data:
                yield "\n".join(data)
            data, name = [], ""
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
    if data:  # a last event without its blank line: still checked
        yield "\n".join(data)


async def stream_one(client: httpx.AsyncClient, index: int, spec: Spec, deadline: float) -> Stream:
    """One streamed request, checked as it arrives; past `deadline` (perf_counter) it fails as "deadline"."""
    s = Stream(index, time.perf_counter())
    try:
        await asyncio.wait_for(_read(client, spec, s), deadline - s.sent_at)
    except asyncio.TimeoutError:
        s.failure = s.failure or "deadline"
    except httpx.HTTPError as e:
        s.failure = s.failure or f"transport_{type(e).__name__}"
    return s


async def _read(client: httpx.AsyncClient, spec: Spec, s: Stream) -> None:
    async with client.stream("POST", spec.path, json=spec.body(stream=True)) as r:
        if r.status_code != 200:
            s.failure = f"http_{r.status_code}"
            return
        async for payload in sse_payloads(r):
            s.record(payload, time.perf_counter())


async def reference(client: httpx.AsyncClient, spec: Spec) -> Reference:
    r = await client.post(spec.path, json=spec.body(stream=False))
    if r.status_code != 200:
        raise RuntimeError(f"the reference request to {spec.path} (prompt of {len(spec.prompt)} characters, "
                           f"max_tokens {spec.max_tokens}) got {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if spec.chat else choice["text"]
    return Reference(text, choice["token_ids"])


async def bounded(n: int, concurrency: int, one: Callable[[int], Awaitable[T]]) -> list[T]:
    """`one(i)` for i in range(n), `concurrency` at a time; results in index order."""
    indices = iter(range(n))  # shared by the workers: each takes the next index, so the count bounds the loop
    out: list[Any] = [None] * n

    async def worker() -> None:
        for i in indices:
            out[i] = await one(i)

    await asyncio.gather(*(worker() for _ in range(min(n, concurrency))))
    return out


# -- the run -----------------------------------------------------------------------------------------------


def percentiles_ms(xs: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50 and p99 in milliseconds."""
    s = sorted(xs)

    def at(q: float) -> float | None:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1e3, 2) if s else None

    return {"p50": at(0.5), "p99": at(0.99)}


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    distinct: int
    seconds: float = 0.0
    completed: int = 0
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    mismatched: int = 0  # completed streams whose text or ids differ from the reference
    text_mismatched: int = 0  # of which the text differs (else only the ids do)
    usage_mismatched: int = 0  # completed streams whose usage.completion_tokens is not their token count
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failed_by_reason.values())

    @property
    def ok(self) -> bool:
        return not (self.failed or self.lost or self.duplicated or self.out_of_order or self.mismatched
                    or self.usage_mismatched)

    def add(self, s: Stream, ref: Reference) -> None:
        if s.verdict is not None:
            self.failed_by_reason[s.verdict] += 1
            return
        self.completed += 1
        missing, extra = Counter(ref.token_ids) - Counter(s.token_ids), Counter(s.token_ids) - Counter(ref.token_ids)
        self.lost += sum(missing.values())
        self.duplicated += sum(extra.values())
        if not missing and not extra:
            self.out_of_order += sum(a != b for a, b in zip(ref.token_ids, s.token_ids))
        self.mismatched += int(s.text != ref.text or s.token_ids != ref.token_ids)
        self.text_mismatched += int(s.text != ref.text)
        self.usage_mismatched += int(s.usage_tokens != len(s.token_ids))
        self.tokens += len(s.token_ids)
        self.e2e_s.append(s.done_at - s.sent_at)
        if s.first_at is not None:
            self.ttft_s.append(s.first_at - s.sent_at)
            if len(s.token_ids) > 1:
                self.tpot_s.append((s.last_at - s.first_at) / (len(s.token_ids) - 1))

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "requests": self.requests, "concurrency": self.concurrency, "distinct": self.distinct,
                "completed": self.completed, "failed": self.failed, "failed_by_reason": dict(self.failed_by_reason),
                "lost": self.lost, "duplicated": self.duplicated, "out_of_order": self.out_of_order,
                "mismatched": self.mismatched, "text_mismatched": self.text_mismatched,
                "usage_mismatched": self.usage_mismatched, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "ttft_ms": percentiles_ms(self.ttft_s),
                "tpot_ms": percentiles_ms(self.tpot_s), "e2e_ms": percentiles_ms(self.e2e_s),
                "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else None,
                "requests_per_s": round(self.completed / self.seconds, 2) if self.seconds else None}

    def table(self) -> str:
        j = self.as_json()
        lat = "\n".join(f"  {name:8} p50 {j[key]['p50']} ms   p99 {j[key]['p99']} ms"
                        for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")))
        return (f"load: {j['requests']} streamed requests ({j['distinct']} distinct) at concurrency "
                f"{j['concurrency']} in {j['seconds']} s\n"
                f"  completed {j['completed']}, failed {j['failed']} {j['failed_by_reason'] or ''}\n"
                f"  tokens: lost {j['lost']}, duplicated {j['duplicated']}, out of order {j['out_of_order']}; "
                f"streams mismatched {j['mismatched']} (text {j['text_mismatched']}), "
                f"usage mismatched {j['usage_mismatched']}\n"
                f"{lat}\n  throughput {j['tokens_per_s']} tokens/s, {j['requests_per_s']} requests/s")


async def _drive(url: str, o: LoadOptions) -> LoadReport:
    deadline = time.perf_counter() + o.deadline_s
    limits = httpx.Limits(max_connections=o.concurrency, max_keepalive_connections=o.concurrency)
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=10.0)
    # trust_env=False: a proxy from the environment would sit between us and the server and skew every figure
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False) as client:
        card = (await client.get("/v1/models")).raise_for_status().json()["data"][0]
        specs = make_specs(random.Random(o.seed), o.distinct, card["max_model_len"], o.max_tokens)
        try:
            refs = await asyncio.wait_for(bounded(len(specs), o.concurrency, lambda i: reference(client, specs[i])),
                                          deadline - time.perf_counter())
        except asyncio.TimeoutError:
            raise RuntimeError(f"the {len(specs)} reference requests did not finish within --deadline") from None
        report = LoadReport(o.requests, o.concurrency, o.distinct)
        t0 = time.perf_counter()
        streams = await bounded(o.requests, o.concurrency,
                                lambda i: stream_one(client, i, specs[i % len(specs)], deadline))
        report.seconds = time.perf_counter() - t0
    for s in streams:
        report.add(s, refs[s.spec % len(specs)])
    return report


def run_load(url: str, options: LoadOptions) -> LoadReport:
    """The whole run against a server at `url`: references, then the streamed requests. Requests still open at
    the deadline fail as "deadline"; the report covers everything sent."""
    return asyncio.run(_drive(url.rstrip("/"), options))


def run_load_bench(a: argparse.Namespace) -> int:
    """`outrider bench load`: exit 1 when any stream failed or disagreed with its reference."""
    if (a.url is None) == (a.profile is None):
        raise ValueError("give exactly one of --url URL (a running server) or --profile P (start `outrider serve`)")
    if not str(a.concurrency).isdigit():  # `bench serving` takes a list of levels; load takes one number
        raise ValueError(f"bench load takes one --concurrency number, got {a.concurrency!r}")
    options = LoadOptions(a.requests, int(a.concurrency), a.distinct, 0 if a.seed is None else a.seed,
                          a.max_tokens, a.deadline)
    with nullcontext(a.url) if a.url else served(a.profile) as url:
        report = run_load(url, options)
    print(report.table())
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0 if report.ok else 1
