"""A profile made runnable: tokenizer, models (in this process or in placed Ray actors), the engine and the async
scheduler. The HTTP server, `outrider batch` and the serving benchmark all start one of these."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from outrider.build import Deployment
from outrider.profile import Profile
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.engine import Engine, Request, SpecStats
from outrider.scheduler.grammar import Grammar, GrammarTokenizer
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.serving import AsyncScheduler, RequestHandle, SpeculationGate, Unavailable

if TYPE_CHECKING:  # Ray is imported only where actors run
    from outrider.actors.remote import ActorDrafter, ActorTarget

log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats
    ttft_s: float | None
    seconds: float


@dataclass(frozen=True)
class Remote:
    """The engine's parts that run in Ray actors (health, failure counts, tests reach the actors through it)."""

    target: "ActorTarget | None"
    drafter: "ActorDrafter | None"


@dataclass
class Service:
    profile: Profile
    tokenizer: Tokenizer
    engine: Engine
    scheduler: AsyncScheduler
    model_name: str
    load_seconds: float
    deployment: Deployment
    placed: Remote | None = None  # None when every model runs in this process
    _grammar_tokenizer: GrammarTokenizer | None = None

    @classmethod
    def start(cls, profile: Profile) -> "Service":
        """Load the models where the profile places them (blocking) and build the engine and scheduler."""
        t0 = time.perf_counter()
        limits = profile.scheduler
        # Every torch call of the engine, loading included, runs on this one thread. A second thread doing torch
        # work gives the process a second OpenMP team; with more OpenMP threads than cores libgomp stops
        # spin-waiting between parallel regions, and each of the thousands of regions per forward pays a
        # wake-up: measured 30% slower rounds (verify 119 vs 96 ms, draft 111 vs 74 ms on the default pair).
        engine_thread = ThreadPoolExecutor(1, thread_name_prefix="outrider-engine")
        if profile.placement.mode != "local":
            from outrider.actors.placement import connect  # Ray is imported only where actors run

            connect()  # on this (the main) thread: Ray installs its signal handlers only there
        if profile.placement.mode == "ray":
            # Here the engine thread only verifies. One thread: an idle OpenMP worker of this process would
            # spin-wait on a core the actors are computing on (measured: plain rounds 82 ms against 68).
            engine_thread.submit(torch.set_num_threads, 1).result()
        try:
            deployment = engine_thread.submit(Deployment.start, profile).result()
            engine = engine_thread.submit(deployment.engine).result()
        except BaseException:
            engine_thread.shutdown(wait=False)
            raise
        scheduler = AsyncScheduler(engine, limits.max_running, limits.max_queued,
                                   SpeculationGate() if limits.speculation_gate else None,
                                   engine_thread=engine_thread)
        target, drafter = deployment.remote_parts(engine)
        name = profile.server.served_model_name or _display_name(profile.models.target.model)
        return cls(profile, deployment.tokenizer, engine, scheduler, name, time.perf_counter() - t0, deployment,
                   Remote(target, drafter) if target is not None or drafter is not None else None)

    async def __aenter__(self) -> "Service":
        await self.scheduler.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.scheduler.stop()

    def grammar(self, schema: dict | None) -> Grammar:
        """The compiled grammar of JSON valid for `schema` (None: any JSON object); ValueError when it cannot be
        compiled. The grammar engine's view of the tokenizer is built on first use (about 1 s)."""
        return self._grammars().json_schema(schema)

    def grammar_lark(self, lark: str) -> Grammar:
        """A grammar written in llguidance's Lark dialect (a forced tool call); ValueError when it does not
        compile."""
        return self._grammars().lark(lark)

    def _grammars(self) -> GrammarTokenizer:
        """The grammar engine's view of the tokenizer, built on first use."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = GrammarTokenizer(self.tokenizer.backend.to_str(), self.engine.target.vocab_size,
                                                       self.tokenizer.eos_token_ids)
        return self._grammar_tokenizer

    def request(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                stop_ids: frozenset[int] | None = None, logprobs: int | None = None,
                prompt_logprobs: int | None = None, grammar: Grammar | None = None) -> Request:
        if max_tokens > self.profile.scheduler.max_tokens:
            raise ValueError(f"max_tokens {max_tokens} exceeds this server's limit of "
                             f"{self.profile.scheduler.max_tokens} (profile scheduler.max_tokens)")
        stop = frozenset(self.tokenizer.eos_token_ids) if stop_ids is None else stop_ids
        return Request(list(prompt_ids), max_tokens, params, stop, logprobs, prompt_logprobs, grammar)

    def submit(self, request: Request, request_id: str | None = None) -> RequestHandle:
        target = self.placed.target.recovery.state if self.placed and self.placed.target else "ok"
        if target != "ok":
            raise Unavailable(f"the target model {'cannot restart' if target == 'dead' else 'is restarting'} "
                              "after a failure; retry shortly")
        return self.scheduler.submit(request, request_id)

    def health(self) -> dict[str, str]:
        """Per part: the scheduler loop (ok | stopped) and, with actors, each role (ok | recovering | dead).
        A recovering draft still serves (without speculation); a target that is not ok does not."""
        parts = {"scheduler": "ok" if self.scheduler.alive else "stopped"}
        if self.placed is not None:
            if self.placed.target is not None:
                parts["target"] = self.placed.target.recovery.state
            if self.placed.drafter is not None:
                parts["draft"] = self.placed.drafter.recovery.state
        return parts

    async def complete(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                       stop_ids: frozenset[int] | None = None) -> Completion:
        """Generate to the end; many of these awaited together are batched into the same rounds."""
        handle = self.submit(self.request(prompt_ids, max_tokens, params, stop_ids))
        try:
            async for _ in handle:
                pass
        finally:
            handle.cancel()  # no-op when finished; frees KV if this coroutine was cancelled
        return Completion(self.tokenizer.decode(handle.token_ids), handle.token_ids, handle.finish_reason or "length",
                          handle.stats, handle.ttft, (handle.finished_at or time.perf_counter()) - handle.created)

    def actor_failures(self) -> dict[str, int]:
        """Failed actor calls so far per role (none in local mode)."""
        if self.placed is None:
            return {}
        roles = {}
        if self.placed.target is not None:
            roles["target"] = self.placed.target.recovery.failures
        if self.placed.drafter is not None:
            roles["draft"] = self.placed.drafter.recovery.failures
        return roles

    def kv_slots_in_use(self) -> dict[str, object]:
        """Slots held in each model's cache, per target stage (a finished or aborted request must bring these
        back to baseline)."""
        out: dict[str, object] = {"target": self.engine.target.slots_in_use()}
        if self.engine.drafter is not None:
            out["draft"] = self.engine.drafter.slots_in_use()
        return out

    def shutdown(self) -> None:
        self.scheduler.close()
        self.deployment.shutdown()
        self.placed = None


def _display_name(model: str) -> str:
    return Path(model).name.removesuffix(".gguf") if ("/" in model or model.endswith(".gguf")) else model
