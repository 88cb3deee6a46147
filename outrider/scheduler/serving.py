"""The async scheduler: many concurrent requests over one `Engine`, one target forward per round for all of them.

Streaming contract: `submit` returns a `RequestHandle` at once (or raises `QueueFull` / `ValueError`); iterating
it yields lists of new token ids, round by round, and ends after the round that finished the request (its
`finish_reason` is then "stop", "length" or "abort"); a failure inside the engine ends every affected stream by
raising `RequestFailed` from the iteration. `cancel()` (a client disconnect) removes the request before the next
round and frees its KV in both models.

No torch work runs on the event loop: admissions (prefill), rounds and releases run one at a time on a single
engine thread, so the engine and its caches are never touched concurrently.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from outrider.scheduler.engine import Engine, Request, Sequence, SpecStats

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every running slot and every queue place is taken: shed load (HTTP 429) instead of hanging."""


class Unavailable(RuntimeError):
    """A model is restarting after a failure (HTTP 503 with Retry-After) or cannot come back."""


class RequestFailed(RuntimeError):
    """The engine failed while serving this request; the stream ends with this error."""


_END = object()
# Prompt tokens admitted (prefilled) between two rounds. A burst of arrivals admitted at once holds every
# running stream still, and delays every newcomer's first token, until all of their prefills are done; a budget
# interleaves prefills with decoding rounds (at least one request is admitted per round, whatever its length).
# 64 tokens: about one chat prompt, ≈ 1 s of prefill for the 1.5B target on 2 cores.
PREFILL_BUDGET = 64


@dataclass
class RequestHandle:
    request_id: str
    request: Request
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    seq: Sequence | None = None
    cancelled: bool = False
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _cancel: Callable[["RequestHandle"], None] | None = None

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        if not self.cancelled and self.finished_at is None and self._cancel:
            self._cancel(self)

    @property
    def finish_reason(self) -> str | None:
        return self.seq.finish_reason if self.seq else ("abort" if self.cancelled else None)

    @property
    def stats(self) -> SpecStats:
        return self.seq.stats if self.seq else SpecStats()

    @property
    def token_ids(self) -> list[int]:
        return self.seq.generated if self.seq else []

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.created

    def _push(self, tokens: list[int]) -> None:
        if tokens and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._queue.put_nowait(tokens)

    def _end(self, error: BaseException | None = None) -> None:
        if self.finished_at is None:
            self.finished_at = time.perf_counter()
            if error is not None:
                self._queue.put_nowait(error)
            self._queue.put_nowait(_END)


@dataclass(frozen=True)
class RoundReport:
    """What one round did, for metrics and calibration hooks. Lists are per running sequence."""

    handles: list[RequestHandle]
    new_tokens: list[list[int]]
    proposed: list[int]  # draft tokens proposed this round
    accepted: list[int]  # of which accepted
    speculated: bool
    seconds: float


@dataclass
class SpeculationGate:
    """Switch drafting off while it measurably does not pay, per batch size.

    For each batch-size bucket (1, 2, 4, 8, ...) keep an EMA of committed tokens per second of round time with
    and without drafting; use the better mode and probe the other for `probe_rounds` rounds out of every
    `probe_every`, so the choice follows the load and the text. The first round after a switch is not counted:
    it pays for the switch (a drafter that sat out catches up on every token committed meanwhile), which would
    otherwise bias every probe against drafting. Both modes are lossless, so the gate only moves speed.
    """

    probe_every: int = 32
    probe_rounds: int = 3
    smoothing: float = 0.25
    rates: dict[tuple[int, bool], float] = field(default_factory=dict)
    rounds: dict[int, int] = field(default_factory=dict)
    last: dict[int, bool] = field(default_factory=dict)  # bucket -> the mode of its latest round
    samples: dict[tuple[int, bool], int] = field(default_factory=dict)

    def speculate(self, batch_size: int) -> bool:
        b = _bucket(batch_size)
        on, off = self.rates.get((b, True)), self.rates.get((b, False))
        if on is None or off is None:
            return on is None  # measure drafting first, then plain decoding
        best = on >= off
        probing = self.rounds.get(b, 0) % self.probe_every >= self.probe_every - self.probe_rounds
        return (not best) if probing else best

    def record(self, batch_size: int, speculated: bool, tokens: int, seconds: float) -> None:
        b = _bucket(batch_size)
        self.rounds[b] = self.rounds.get(b, 0) + 1
        switched = self.last.get(b, speculated) != speculated
        self.last[b] = speculated
        if switched or seconds <= 0:
            return
        key, rate = (b, speculated), tokens / seconds
        n = self.samples[key] = self.samples.get(key, 0) + 1
        # The running mean for the first samples, an EMA after: one slow early round (a cold cache) must not
        # hold a mode down for many probes.
        old = self.rates.get(key, rate)
        self.rates[key] = old + max(self.smoothing, 1 / n) * (rate - old)


def _bucket(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


class AsyncScheduler:
    def __init__(self, engine: Engine, max_running: int = 16, max_queued: int = 64,
                 gate: SpeculationGate | None = None, prefill_budget: int = PREFILL_BUDGET,
                 engine_thread: ThreadPoolExecutor | None = None):
        self.engine = engine
        self.max_running, self.max_queued = max_running, max_queued
        self.prefill_budget = prefill_budget
        self.gate = gate
        self.after_round: list[Callable[[RoundReport], None]] = []  # metrics, KV calibration
        self.waiting: deque[RequestHandle] = deque()
        self.running: list[RequestHandle] = []
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = engine_thread or ThreadPoolExecutor(1, thread_name_prefix="outrider-engine")

    # -- the client side ------------------------------------------------------------------------------------

    def submit(self, request: Request, request_id: str | None = None) -> RequestHandle:
        self.engine.validate(request)  # ValueError → HTTP 400, before the request takes a queue place
        if len(self.waiting) >= self.max_queued and len(self.running) >= self.max_running:
            raise QueueFull(f"{len(self.running)} requests running and {len(self.waiting)} queued "
                            f"(limits {self.max_running} and {self.max_queued}); retry later")
        handle = RequestHandle(request_id or f"req-{next(self._ids)}", request, _cancel=self._cancel)
        self.waiting.append(handle)
        self._poke()
        return handle

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def alive(self) -> bool:
        """The loop is running (health checks)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="outrider-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for h in list(self.waiting) + self.running:
            await self._finish(h, RequestFailed("the server is shutting down"))
        self.waiting.clear()

    def close(self) -> None:
        """Let the engine thread go (after `stop`); the scheduler cannot start again."""
        self._executor.shutdown(wait=True)

    # -- the loop -------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            await self._drop_cancelled()
            await self._admit()
            if self.running:
                await self._round()

    async def _admit(self) -> None:
        budget = self.prefill_budget
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            h = self.waiting.popleft()
            budget -= len(h.request.prompt_ids)
            try:
                h.seq = await self._on_engine(self.engine.add, h.request)
            except Exception as e:  # noqa: BLE001 — a bad request ends its own stream, never the loop
                log.warning("admitting %s failed: %s", h.request_id, e)
                h._end(RequestFailed(str(e)))
                continue
            if h.cancelled:  # cancelled while its prompt was prefilled
                await self._finish(h)
            else:
                self.running.append(h)

    async def _round(self) -> None:
        handles = list(self.running)
        seqs = [h.seq for h in handles]
        before = [(s.stats.draft_tokens, s.stats.accepted_tokens) for s in seqs]
        speculate = self.gate.speculate(len(seqs)) if self.gate else True
        t0 = time.perf_counter()
        try:
            new = await self._on_engine(self.engine.step, seqs, speculate)
        except Exception as e:  # noqa: BLE001 — fail the batch, keep serving
            log.exception("a round failed; ending its %d requests", len(handles))
            for h in handles:
                await self._finish(h, RequestFailed(f"generation failed: {e}"))
            return
        seconds = time.perf_counter() - t0
        if self.gate:
            self.gate.record(len(seqs), speculate, sum(map(len, new)), seconds)
        report = RoundReport(handles, new, [s.stats.draft_tokens - b[0] for s, b in zip(seqs, before)],
                             [s.stats.accepted_tokens - b[1] for s, b in zip(seqs, before)], speculate, seconds)
        for h, tokens in zip(handles, new):
            h._push(tokens)
            if h.seq.finished:
                await self._finish(h)
        for hook in self.after_round:
            hook(report)

    async def _drop_cancelled(self) -> None:
        for h in [h for h in self.waiting if h.cancelled]:
            self.waiting.remove(h)
            h._end()
        for h in [h for h in self.running if h.cancelled]:
            await self._finish(h)

    async def _finish(self, h: RequestHandle, error: BaseException | None = None) -> None:
        """Free the request's KV in both models and end its stream."""
        if h in self.running:
            self.running.remove(h)
        try:
            if h.seq is not None:
                await self._on_engine(self.engine.release, h.seq, "abort")
        except Exception:  # noqa: BLE001 — a dead model process cannot free KV; the stream must still end
            log.exception("releasing %s failed", h.request_id)
        h._end(error)

    def _cancel(self, h: RequestHandle) -> None:
        h.cancelled = True
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _on_engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
