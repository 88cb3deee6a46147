"""A profile made runnable: tokenizer, models (in this process or in placed Ray actors), the engine and the async
scheduler. The HTTP server, `outrider batch` and the serving benchmark all start one of these."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from outrider.profile import Profile
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.engine import Engine, Request, SpecStats
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.serving import AsyncScheduler, RequestHandle, SpeculationGate, Unavailable
from outrider.scheduler.strategies import StrategyContext, get_strategy
from outrider.scheduler.target import LocalTarget

log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats
    ttft_s: float | None
    seconds: float


@dataclass
class Service:
    profile: Profile
    tokenizer: Tokenizer
    engine: Engine
    scheduler: AsyncScheduler
    model_name: str
    load_seconds: float
    placed: object | None = None  # outrider.actors.placement.Placed in ray mode

    @classmethod
    def start(cls, profile: Profile) -> "Service":
        """Load the models where the profile places them (blocking) and build the engine and scheduler."""
        t0 = time.perf_counter()
        strategy = get_strategy(profile.strategy.name)
        limits = profile.scheduler
        placed = None
        # Every torch call of the engine, loading included, runs on this one thread. A second thread doing torch
        # work gives the process a second OpenMP team; with more OpenMP threads than cores libgomp stops
        # spin-waiting between parallel regions, and each of the thousands of regions per forward pays a
        # wake-up: measured 30% slower rounds (verify 119 vs 96 ms, draft 111 vs 74 ms on the default pair).
        engine_thread = ThreadPoolExecutor(1, thread_name_prefix="outrider-engine")
        if profile.placement.mode == "local":
            target, drafter = engine_thread.submit(_local_models, profile, strategy.needs_draft_model).result()
        else:
            from outrider.actors.placement import place

            # Here the engine thread only verifies. One thread: an idle OpenMP worker of this process would
            # spin-wait on a core the actors are computing on (measured: plain rounds 82 ms against 68).
            engine_thread.submit(torch.set_num_threads, 1).result()

            placed = place(profile, limits.max_running, limits.max_seq_len, strategy.needs_draft_model)
            target, drafter = placed.target, placed.drafter
        ctx = StrategyContext(None, profile.strategy.k, profile.strategy.policy == "adaptive", limits.max_running,
                              limits.max_seq_len, hosted_drafter=drafter, auto_k=profile.strategy.policy == "auto")
        engine = Engine(target, *strategy.build(ctx))
        scheduler = AsyncScheduler(engine, limits.max_running, limits.max_queued,
                                   SpeculationGate() if limits.speculation_gate else None,
                                   engine_thread=engine_thread)
        name = profile.server.served_model_name or _display_name(profile.models.target.model)
        return cls(profile, _tokenizer(profile), engine, scheduler, name, time.perf_counter() - t0, placed)

    async def __aenter__(self) -> "Service":
        await self.scheduler.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.scheduler.stop()

    def request(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                stop_ids: frozenset[int] | None = None) -> Request:
        if max_tokens > self.profile.scheduler.max_tokens:
            raise ValueError(f"max_tokens {max_tokens} exceeds this server's limit of "
                             f"{self.profile.scheduler.max_tokens} (profile scheduler.max_tokens)")
        stop = frozenset(self.tokenizer.eos_token_ids) if stop_ids is None else stop_ids
        return Request(list(prompt_ids), max_tokens, params, stop)

    def submit(self, request: Request, request_id: str | None = None) -> RequestHandle:
        target = self.placed.target.recovery.state if self.placed is not None else "ok"
        if target != "ok":
            raise Unavailable(f"the target model {'cannot restart' if target == 'dead' else 'is restarting'} "
                              "after a failure; retry shortly")
        return self.scheduler.submit(request, request_id)

    def health(self) -> dict[str, str]:
        """Per part: the scheduler loop (ok | stopped) and, with actors, each role (ok | recovering | dead).
        A recovering draft still serves (without speculation); a target that is not ok does not."""
        parts = {"scheduler": "ok" if self.scheduler.alive else "stopped"}
        if self.placed is not None:
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
        roles = {"target": self.placed.target.recovery.failures}
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
        if self.placed is not None:
            self.placed.shutdown()
            self.placed = None


def _local_models(profile: Profile, needs_draft: bool):
    from outrider.pipeline import check_vocabularies
    from outrider.runtime.loading import load_model
    from outrider.scheduler.drafters import ModelDrafter

    torch.set_num_threads(profile.placement.target[0].threads or 2)
    limits, t = profile.scheduler, profile.models.target
    device = _local_device(profile.placement.target[0].device)
    target_model, _ = load_model(t.model, t.dtype, t.weights, device, limits.max_seq_len)
    target = LocalTarget(target_model, limits.max_running, limits.max_seq_len)
    drafter = None
    if needs_draft:
        d = profile.models.draft
        draft_model, _ = load_model(d.model, d.dtype, d.weights, _local_device(profile.placement.draft[0].device),
                                    limits.max_seq_len, batch_invariant=False)
        check_vocabularies(target_model.config.vocab_size, draft_model.config.vocab_size, t.model, d.model)
        drafter = ModelDrafter(draft_model, limits.max_running, limits.max_seq_len)
    return target, drafter


def _local_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def _tokenizer(profile: Profile) -> Tokenizer:
    from outrider.hub import resolve
    from outrider.runtime.checkpoint import load_checkpoint

    return Tokenizer.load(load_checkpoint(resolve(profile.models.target.model)).tokenizer_source)


def _display_name(model: str) -> str:
    from pathlib import Path

    return Path(model).name.removesuffix(".gguf") if ("/" in model or model.endswith(".gguf")) else model
