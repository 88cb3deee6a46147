"""The speculative loop is lossless: every drafter and k gives the target's own greedy tokens."""
from __future__ import annotations

import pytest
import torch
from conftest import PROMPT, plain, speculative, tiny_model
from fakes import OracleDrafter

from outrider.methods.prompt_lookup import PromptLookupDrafter
from outrider.scheduler.drafters import ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import AdaptiveK, FixedK
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget


@pytest.mark.parametrize("k", range(1, 9))
def test_full_acceptance_when_the_draft_is_the_target(target, reference, k):
    seq = speculative(target, ModelDrafter(target, capacity=256), k)
    assert seq.generated == reference
    assert seq.stats.accepted_tokens == seq.stats.draft_tokens  # every draft accepted


@pytest.mark.parametrize("k", range(1, 9))
def test_zero_acceptance_from_an_unrelated_draft_model(target, reference, k):
    other = tiny_model("llama", seed=123)
    seq = speculative(target, ModelDrafter(other, capacity=256), k)
    assert seq.generated == reference
    assert seq.stats.accepted_tokens < seq.stats.draft_tokens


@pytest.mark.parametrize("k", range(1, 9))
def test_mixed_acceptance(target, reference, k):
    seq = speculative(target, OracleDrafter(len(PROMPT), reference), k)
    assert seq.generated == reference
    assert 0 < seq.stats.accepted_tokens < seq.stats.draft_tokens


@pytest.mark.parametrize("k", [1, 3, 8])
def test_prompt_lookup(target, reference, k):
    assert speculative(target, PromptLookupDrafter(), k).generated == reference


@pytest.mark.parametrize("dtype,weights", [(torch.bfloat16, "dense"), (torch.bfloat16, "int8"),
                                           (torch.bfloat16, "int4"), (torch.float32, "int8")])
def test_lossless_at_served_formats(dtype, weights):
    t = tiny_model("qwen2", seed=3, dtype=dtype, weights=weights)
    d = tiny_model("qwen2", seed=3, dtype=torch.bfloat16, weights="int4")  # a quantized copy as the draft
    ref = plain(t, max_tokens=48)
    for k in (2, 5, 8):
        seq = speculative(t, ModelDrafter(d, capacity=256), k, max_tokens=48)
        assert seq.generated == ref, f"k={k}"


def test_adaptive_draft_length_is_lossless(target, reference):
    engine = Engine(LocalTarget(target, capacity=256), ModelDrafter(target, capacity=256), AdaptiveK)
    seq = engine.generate(Request(PROMPT, 40))
    assert seq.generated == reference


def test_stops_at_eos_exactly_where_plain_decoding_does(target, reference):
    eos = reference[17]
    expected = reference[:reference.index(eos) + 1]
    assert plain(target, stop=frozenset({eos})) == expected
    for k in (1, 4, 8):
        seq = speculative(target, ModelDrafter(target, capacity=256), k, stop=frozenset({eos}))
        assert seq.generated == expected and seq.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 9, 10])
def test_max_tokens_holds_even_when_a_round_accepts_more(target, reference, max_tokens):
    seq = speculative(target, ModelDrafter(target, capacity=256), 8, max_tokens=max_tokens)
    assert seq.generated == reference[:max_tokens] and seq.finish_reason == "length"


def test_kv_after_accept_and_rollback_equals_a_fresh_prefill(target):
    """After every round the target's next-token logits equal those of a fresh prefill of the committed tokens."""
    engine_target = LocalTarget(target, capacity=256)
    engine = Engine(engine_target, ModelDrafter(tiny_model("llama", seed=7), capacity=256), lambda: FixedK(4))
    seq = engine.add(Request(PROMPT, 30))
    while not seq.finished:
        engine.step([seq])
        committed = seq.tokens
        nxt = engine_target.score([seq.slot], [[committed[-1]]])[0]
        engine_target.truncate(seq.slot, len(committed) - 1)
        fresh = LocalTarget(target, capacity=256)
        slot = fresh.acquire()
        fresh.prefill(slot, committed[:-1])
        assert torch.equal(nxt, fresh.score([slot], [[committed[-1]]])[0])
    engine.release(seq)
    assert engine_target.cache.slots_in_use == 0


def test_sampling_is_deterministic_under_a_seed_and_greedy_ignores_it(target):
    hot = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    drafter = ModelDrafter(tiny_model("llama", seed=5), capacity=256)
    a = speculative(target, drafter, 3, params=hot).generated
    b = speculative(target, ModelDrafter(tiny_model("llama", seed=5), capacity=256), 3, params=hot).generated
    assert a == b
    assert plain(target, params=SamplingParams(seed=1)) == plain(target, params=SamplingParams(seed=2))


def test_several_sequences_in_one_step_match_each_alone(target):
    prompts = [PROMPT, PROMPT[:4], [7, 8, 9, 10, 11, 12, 13]]
    alone = [plain(target, p, max_tokens=20) for p in prompts]
    engine = Engine(LocalTarget(target, num_slots=3, capacity=256), ModelDrafter(target, num_slots=3, capacity=256),
                    lambda: FixedK(3))
    seqs = [engine.add(Request(p, 20)) for p in prompts]
    while any(not s.finished for s in seqs):
        live = [s for s in seqs if not s.finished]
        engine.step(live)
    assert [s.generated for s in seqs] == alone


def test_requests_that_do_not_fit_are_refused_before_any_work(target):
    engine = Engine(LocalTarget(target, capacity=64))
    with pytest.raises(ValueError, match="context limit of 64"):
        engine.add(Request(PROMPT, 60))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add(Request([3, 999], 5))
    with pytest.raises(ValueError, match="empty"):
        engine.add(Request([], 5))
    assert engine.target.cache.slots_in_use == 0


def test_finished_and_failed_sequences_free_both_caches(target):
    drafter = ModelDrafter(target, capacity=256)
    engine = Engine(LocalTarget(target, capacity=256), drafter, lambda: FixedK(3))
    engine.generate(Request(PROMPT, 12))
    seq = engine.add(Request(PROMPT, 12))
    next(engine.stream(seq))  # a client that reads one round and goes away
    engine.release(seq)
    assert engine.target.cache.slots_in_use == 0 and drafter.cache.slots_in_use == 0
