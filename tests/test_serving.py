"""The async scheduler: concurrent requests batched into shared rounds give each request exactly what it gets
alone; cancelling frees KV; a full queue sheds load; an engine failure ends streams with an error and the loop
keeps serving; the speculation gate picks the faster mode."""
from __future__ import annotations

import asyncio

import pytest
from conftest import tiny_model

from outrider.scheduler.drafters import ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import AdaptiveK, FixedK
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.serving import AsyncScheduler, QueueFull, RequestFailed, RoundReport, SpeculationGate
from outrider.scheduler.target import LocalTarget

PROMPTS = [[5 + i, 9, 17, 5, 9, 33 + 2 * i, 80][: 3 + i % 5] for i in range(16)]
CAPACITY = 128


@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", seed=3, batch_invariant=False)


def alone(target, prompt, max_tokens, params=SamplingParams()) -> list[int]:
    return Engine(LocalTarget(target, 1, CAPACITY)).generate(Request(prompt, max_tokens, params)).generated


def serving_engine(target, draft, slots=16, policy=lambda: FixedK(3)) -> Engine:
    return Engine(LocalTarget(target, slots, CAPACITY), ModelDrafter(draft, slots, CAPACITY), policy)


async def run_all(scheduler: AsyncScheduler, requests: list[Request]) -> list[list[int]]:
    reports: list[RoundReport] = []
    scheduler.after_round.append(reports.append)
    await scheduler.start()
    try:
        handles = [scheduler.submit(r) for r in requests]
        streams = [[t async for chunk in h for t in chunk] for h in handles]  # consumed one after another
        assert all(h.finish_reason == "length" for h in handles)
        assert streams == [h.token_ids for h in handles]  # the stream carries every token once, in order
    finally:
        await scheduler.stop()
    # Equality with decoding alone says something about speculation only if it happened: drafts were proposed
    # and the unrelated draft had some rejected (so rollbacks and recovered tokens were on the path too).
    proposed, accepted = sum(h.stats.draft_tokens for h in handles), sum(h.stats.accepted_tokens for h in handles)
    assert proposed == sum(map(sum, (r.proposed for r in reports))) > 0
    assert accepted < proposed, "every draft was accepted: the rejection path went untested"
    return streams


def rounds_of(reports: list[RoundReport], request: Request) -> list[tuple[bool, int, int]]:
    """(the round speculated, drafts proposed, of which accepted) for every round the request took part in."""
    return [(r.speculated, r.proposed[i], r.accepted[i]) for r in reports for i, h in enumerate(r.handles)
            if h.request is request]


@pytest.mark.parametrize("policy", [lambda: FixedK(3), lambda: AdaptiveK(k_max=6)], ids=["fixed", "adaptive"])
def test_16_concurrent_requests_equal_each_alone(target, draft, policy):
    max_tokens = [12 + 3 * (i % 4) for i in range(16)]  # they finish in different rounds
    engine = serving_engine(target, draft, policy=policy)
    got = asyncio.run(run_all(AsyncScheduler(engine, max_running=16, gate=SpeculationGate()),
                              [Request(p, n) for p, n in zip(PROMPTS, max_tokens)]))
    assert got == [alone(target, p, n) for p, n in zip(PROMPTS, max_tokens)]
    assert engine.target.cache.slots_in_use == 0 and engine.drafter.cache.slots_in_use == 0


def test_more_requests_than_slots_wait_their_turn(target, draft):
    engine = serving_engine(target, draft, slots=3)
    got = asyncio.run(run_all(AsyncScheduler(engine, max_running=3, max_queued=16),
                              [Request(p, 10) for p in PROMPTS[:8]]))
    assert got == [alone(target, p, 10) for p in PROMPTS[:8]]


def test_seeded_sampling_is_the_same_batched_or_alone(target, draft):
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i) for i in range(6)]
    engine = serving_engine(target, draft)
    got = asyncio.run(run_all(AsyncScheduler(engine), [Request(p, 15, q) for p, q in zip(PROMPTS, params)]))
    spec_alone = [serving_engine(target, draft, slots=1).generate(Request(p, 15, q)).generated
                  for p, q in zip(PROMPTS, params)]
    assert got == spec_alone


def test_seeded_sampling_does_not_depend_on_the_speculation_gate(target, draft):
    """The gate switches drafting per batch by measured speed; a seeded request drafts in every round anyway,
    so its tokens cannot depend on load. Unseeded and greedy requests follow the gate."""
    class Alternating(SpeculationGate):
        def speculate(self, batch_size: int) -> bool:
            self.flip = not getattr(self, "flip", False)
            return self.flip

    seeded = [Request(p, 15, SamplingParams(temperature=0.9, seed=200 + i)) for i, p in enumerate(PROMPTS[:4])]
    greedy = [Request(p, 15) for p in PROMPTS[4:8]]
    engine = serving_engine(target, draft)
    scheduler, reports = AsyncScheduler(engine, gate=Alternating()), []
    scheduler.after_round.append(reports.append)
    got = asyncio.run(run_all(scheduler, seeded + greedy))
    assert got[:4] == [serving_engine(target, draft, slots=1).generate(r).generated for r in seeded]
    assert got[4:] == [alone(target, r.prompt_ids, 15) for r in greedy]
    # Both kinds of round happened to both kinds of request: seeded ones drafted in rounds the gate turned off,
    # greedy ones drafted only in rounds it left on, and had drafts rejected there.
    for r in seeded:
        assert any(proposed for on, proposed, _ in rounds_of(reports, r) if not on)
    for r in greedy:
        rounds = rounds_of(reports, r)
        assert not any(proposed for on, proposed, _ in rounds if not on)
        assert any(proposed for on, proposed, _ in rounds if on)
    assert any(accepted < proposed for r in greedy for _, proposed, accepted in rounds_of(reports, r))


def test_cancel_mid_stream_frees_kv_in_both_models(target, draft):
    engine = serving_engine(target, draft, slots=2)

    async def scenario():
        scheduler = AsyncScheduler(engine, max_running=2)
        await scheduler.start()
        try:
            keep = scheduler.submit(Request(PROMPTS[0], 20))
            drop = scheduler.submit(Request(PROMPTS[1], 100))
            stream = drop.__aiter__()
            await stream.__anext__()
            assert engine.target.cache.slots_in_use == 2
            drop.cancel()  # what a client disconnect does
            async for _ in stream:  # the stream ends
                pass
            kept = [t async for chunk in keep for t in chunk]
            return drop, kept
        finally:
            await scheduler.stop()

    drop, kept = asyncio.run(scenario())
    assert drop.finish_reason == "abort" and len(drop.token_ids) < 100
    assert kept == alone(target, PROMPTS[0], 20)
    assert engine.target.cache.slots_in_use == 0 and engine.drafter.cache.slots_in_use == 0
    assert engine.drafter.seqs == {}


def test_full_queue_raises_queue_full_and_bad_requests_fail_at_submit(target):
    async def scenario():
        scheduler = AsyncScheduler(Engine(LocalTarget(target, 1, CAPACITY)), max_running=1, max_queued=1)
        await scheduler.start()
        try:
            first = scheduler.submit(Request(PROMPTS[0], 50))
            await first.__aiter__().__anext__()  # running now
            scheduler.submit(Request(PROMPTS[1], 5))  # takes the one queue place
            with pytest.raises(QueueFull, match="retry later"):
                scheduler.submit(Request(PROMPTS[2], 5))
            with pytest.raises(ValueError, match="context limit of 128"):
                scheduler.submit(Request(PROMPTS[2], 500))
            with pytest.raises(ValueError, match="outside the vocabulary"):
                scheduler.submit(Request([10_000], 5))
        finally:
            await scheduler.stop()

    asyncio.run(scenario())


class FailingOnce(LocalTarget):
    """A target whose next score raises, as a crashed model process would."""

    fail_next = False

    def score(self, slots, token_lists):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("model process died")
        return super().score(slots, token_lists)


def test_engine_failure_ends_the_streams_with_an_error_and_serving_goes_on(target):
    failing = FailingOnce(target, 2, CAPACITY)
    engine = Engine(failing)

    async def scenario():
        scheduler = AsyncScheduler(engine, max_running=2)
        await scheduler.start()
        try:
            doomed = scheduler.submit(Request(PROMPTS[0], 50))
            await doomed.__aiter__().__anext__()
            failing.fail_next = True
            with pytest.raises(RequestFailed, match="model process died"):
                async for _ in doomed:
                    pass
            after = scheduler.submit(Request(PROMPTS[1], 10))
            return [t async for chunk in after for t in chunk]
        finally:
            await scheduler.stop()

    assert asyncio.run(scenario()) == alone(target, PROMPTS[1], 10)
    assert failing.cache.slots_in_use == 0


def test_round_reports_add_up_to_the_request_stats(target, draft):
    engine = serving_engine(target, draft)
    reports = []

    async def scenario():
        scheduler = AsyncScheduler(engine)
        scheduler.after_round.append(reports.append)
        await scheduler.start()
        try:
            handles = [scheduler.submit(Request(p, 12)) for p in PROMPTS[:4]]
            for h in handles:
                async for _ in h:
                    pass
            return handles
        finally:
            await scheduler.stop()

    handles = asyncio.run(scenario())
    for h in handles:
        rows = [(r.proposed[i], r.accepted[i], r.new_tokens[i]) for r in reports
                for i, x in enumerate(r.handles) if x is h]
        assert sum(p for p, _, _ in rows) == h.stats.draft_tokens
        assert sum(a for _, a, _ in rows) == h.stats.accepted_tokens
        assert sum(len(n) for _, _, n in rows) == 12


def test_speculation_gate_follows_the_faster_mode_and_keeps_probing():
    gate = SpeculationGate(probe_every=8, probe_rounds=3, smoothing=1.0)
    assert gate.speculate(3) is True  # unmeasured: try drafting first
    gate.record(3, True, tokens=4, seconds=1.0)
    assert gate.speculate(2) is False  # same bucket (2..3): now measure plain decoding
    gate.record(2, False, tokens=9, seconds=1.0)  # the switch round is not counted ...
    assert gate.speculate(2) is False  # ... so plain decoding is measured again
    gate.record(2, False, tokens=2, seconds=1.0)  # 2 tok/s against 4: drafting wins
    decisions = []
    for _ in range(16):
        on = gate.speculate(3)
        decisions.append(on)
        gate.record(3, on, tokens=4 if on else 2, seconds=1.0)
    assert decisions.count(False) == 6  # two probes of 3 plain rounds in 16 rounds
    assert decisions[2:5] == decisions[10:13] == [False] * 3  # rounds 5-7 and 13-15 of every 8
    assert gate.rates[(2, True)] == 4.0 and gate.rates[(2, False)] == 2.0  # switch rounds never counted
    assert gate.speculate(16) is True  # another bucket is measured on its own
