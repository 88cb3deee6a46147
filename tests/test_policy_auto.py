"""PEARL's automatic draft length (AutoK): k = clamp(round(T_verify / T_draft_step) − 1, 1, k_max) from moving
averages of the round's timers, here fed by a virtual clock that the draft and the target advance by set
amounts (no sleeps); greedy output with it equals plain decoding, in one process and through actors."""
from __future__ import annotations

import asyncio

import pytest
import ray
from conftest import PROMPT, in_process, plain, tiny_model
from pydantic import ValidationError
from tiny_folders import write_tiny_pair

from outrider.flags import parse, strategy_options
from outrider.methods import METHODS
from outrider.methods.pearl import AutoK, Overlapped
from outrider.profile import Profile
from outrider.runtime.loading import load_model
from outrider.scheduler.drafters import Draft, DraftRequest, ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import MAX_DRAFT, FixedK
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget
from outrider.service import Service

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def reference(target):
    return plain(target, max_tokens=60)


def test_k_balances_a_draft_block_against_a_verify():
    policy = AutoK(k_max=8)
    assert policy.next_k() == 3  # nothing measured yet: k_start
    policy.observe(0.010, 0.040)  # c = 4: a block of 4 (e_0 and a window of 3) drafts in one verify
    assert policy.next_k() == 3
    policy = AutoK(k_max=8)
    policy.observe(0.010, 0.061)  # c = 6.1 → blocks of 6
    assert policy.next_k() == 5
    fast, slow = AutoK(k_max=5), AutoK(k_max=5)
    fast.observe(0.001, 0.200)
    slow.observe(0.050, 0.040)  # the draft is slower than the target: still one token
    assert (fast.next_k(), slow.next_k()) == (5, 1)
    with pytest.raises(ValueError, match="k_max"):
        AutoK(k_max=MAX_DRAFT + 1)


def test_the_timers_are_moving_averages():
    policy = AutoK(k_max=8, smoothing=0.5)
    policy.observe(0.010, 0.040)
    policy.observe(0.020, 0.040)  # a slower draft step: averaged, 0.015
    assert policy.draft_token_seconds == pytest.approx(0.015) and policy.verify_seconds == pytest.approx(0.040)
    assert policy.next_k() == 2  # round(2.67) − 1
    for _ in range(30):
        policy.observe(0.020, 0.040)
    assert policy.next_k() == 1  # c → 2
    policy.update(3, 0, None)  # acceptance does not move it
    assert policy.next_k() == 1


class VirtualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedDrafter:
    """A real drafter; each proposal advances the clock by one draft step per token of the longest request
    (the sequences' steps are batched)."""

    def __init__(self, inner: ModelDrafter, clock: VirtualClock, step_seconds: float):
        self.inner, self.clock, self.step_seconds, self.ks = inner, clock, step_seconds, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        self.ks.append([r.k for r in requests])
        self.clock.now += self.step_seconds * max(r.k for r in requests)
        return self.inner.propose(requests)


class TimedTarget(LocalTarget):
    """The real target; each verify advances the clock by `verify_seconds`."""

    def __init__(self, model, clock: VirtualClock, verify_seconds: float):
        super().__init__(model, num_slots=2, capacity=256)
        self.clock, self.verify_seconds = clock, verify_seconds

    def score(self, slots, token_lists, *args, **kwargs):
        self.clock.now += self.verify_seconds
        return super().score(slots, token_lists, *args, **kwargs)


@pytest.mark.parametrize("step_ms,verify_ms,k", [(10, 40, 3), (10, 20, 1), (5, 40, 7), (1, 40, 8)])
def test_pearl_rounds_pick_the_k_the_clock_implies_and_stay_lossless(target, reference, step_ms, verify_ms, k):
    clock = VirtualClock()
    drafter = TimedDrafter(ModelDrafter(target, capacity=256), clock, step_ms / 1000)
    engine = Engine(TimedTarget(target, clock, verify_ms / 1000), drafter, lambda: AutoK(k_max=8),
                    Overlapped(clock))
    seq = engine.generate(Request(PROMPT, 60))
    assert seq.generated == reference
    blocks = [ks[0] for ks in drafter.ks]
    assert blocks[0] == 4  # k_start 3, and e_0
    assert seq.policy.next_k() == k
    # every later block is k + 1 long (at most MAX_DRAFT, the widest verify); the last rounds are cut by max_tokens
    assert all(b == min(k + 1, MAX_DRAFT) for b in blocks[1:-2])


def test_auto_k_with_an_unrelated_draft_is_lossless(target, reference):
    clock = VirtualClock()
    drafter = TimedDrafter(ModelDrafter(tiny_model("llama", seed=123), capacity=256), clock, 0.010)
    engine = Engine(TimedTarget(target, clock, 0.050), drafter, lambda: AutoK(k_max=6), Overlapped(clock))
    seq = engine.generate(Request(PROMPT, 60))
    assert seq.generated == reference and seq.policy.next_k() == 4
    assert seq.stats.accepted_tokens < seq.stats.draft_tokens


def test_the_strategy_builds_auto_k_for_pearl_only(target):
    pearl, vanilla = METHODS["pearl"], METHODS["vanilla"]
    policy = pearl.parts(pearl.Options(k=5, policy="auto"), in_process(target)).policy
    assert isinstance(policy(), AutoK) and policy().k_max == 5
    args = parse(["--draft-k", "5", "--auto-k"])  # draft-then-verify rounds do not time an overlap
    policy = vanilla.parts(strategy_options(args, "vanilla", strict=False), in_process(target)).policy
    assert isinstance(policy(), FixedK) and policy().k == 5


def profile_dict(pair, strategy: dict) -> dict:
    spec = {"weights": "dense", "dtype": "float32"}
    return {"name": "test-auto-k", "models": {"target": {"model": str(pair[0]), **spec},
                                               "draft": {"model": str(pair[1]), **spec}},
            "placement": {"target": [{"device": "cpu"}], "draft": [{"device": "cpu"}]}, "strategy": strategy,
            "scheduler": {"max_running": 4, "max_seq_len": 256, "max_tokens": 64, "speculation_gate": False}}


def test_profiles_accept_policy_auto_for_pearl_only(tmp_path):
    pair = (tmp_path / "t", tmp_path / "d")
    assert Profile.model_validate(profile_dict(pair, {"name": "pearl", "policy": "auto"})).strategy.policy == "auto"
    with pytest.raises(ValidationError, match="strategy.policy: auto .* only pearl overlaps"):
        Profile.model_validate(profile_dict(pair, {"name": "vanilla", "policy": "auto"}))


def test_auto_k_through_actors_uses_the_draft_actors_own_timing(tmp_path):
    """The draft actor reports how long it drafted (the scheduler only sees the part the verify did not hide);
    greedy output equals plain decoding."""
    pair = write_tiny_pair(tmp_path)
    model, _ = load_model(str(pair[0]), "float32", "dense")
    prompts = [[70, 71, 72], [267, 276, 10, 11]]
    expected = [Engine(LocalTarget(model, 1, 256)).generate(Request(p, 24)).generated for p in prompts]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    service = Service.start(Profile.model_validate(profile_dict(pair, {"name": "pearl", "policy": "auto", "k": 6})))
    try:
        async def go():
            async with service:
                done = await asyncio.gather(*[service.complete(p, 24, SamplingParams(), frozenset()) for p in prompts])
            return [c.token_ids for c in done]

        assert asyncio.run(go()) == expected
        assert service.placed.drafter.last_propose_seconds > 0
    finally:
        service.shutdown()
        ray.shutdown()
