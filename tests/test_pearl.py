"""PEARL's overlapped rounds are lossless and behave as its mode machine says: greedy output equals the target
alone for every k and any draft; a draft equal to the target is accepted block after block with no bonus token
(post-verify), a draft that always disagrees commits one token per round (pre-verify); sampling reproduces the
target's distribution; the target's KV after every round equals a fresh prefill of the committed tokens."""
from __future__ import annotations

import pytest
import torch
from conftest import PROMPT, plain, tiny_model
from fakes import OracleDrafter
from test_engine_sampling import chi_square_p, exact_two_token_distribution, sampled_counts, small_vocab_model

from outrider.methods.pearl import Overlapped
from outrider.scheduler.drafters import ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.target import LocalTarget


def pearl(target, drafter, k: int, slots: int = 1) -> Engine:
    return Engine(LocalTarget(target, num_slots=slots, capacity=256), drafter, lambda: FixedK(k), Overlapped())


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_a_draft_equal_to_the_target_is_accepted_block_after_block(target, reference, k):
    seq = pearl(target, ModelDrafter(target, capacity=256), k).generate(Request(PROMPT, 40))
    assert seq.generated == reference
    assert seq.stats.accepted_tokens == seq.stats.draft_tokens
    # The first round pre-verifies one token; every later round commits the window and e_0: k + 1 tokens.
    assert seq.stats.rounds == 1 + -(-(40 - 1) // (k + 1))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_a_draft_that_always_disagrees_commits_one_token_per_round(target, reference, k):
    seq = pearl(target, ModelDrafter(tiny_model("llama", seed=123), capacity=256), k).generate(Request(PROMPT, 40))
    assert seq.generated == reference
    assert seq.stats.rounds >= 40 - seq.stats.accepted_tokens
    assert seq.stats.accepted_tokens < seq.stats.draft_tokens
    # A round commits its accepted drafts plus the recovered token, except one that accepts every draft (no
    # bonus row), which commits just those. Here no draft is ever accepted, so the window stays empty: every
    # round is a one-row pre-verify whose rejected e_0 commits one token, and the last (no room left under
    # max_tokens) is a plain one-token round. So rounds == new_tokens - accepted_tokens == 40, 39 of them
    # drafting; a loop committing more or fewer than one token per round fails here.
    assert seq.stats.accepted_tokens == 0 and seq.stats.new_tokens == 40
    assert seq.stats.rounds == seq.stats.new_tokens - seq.stats.accepted_tokens == 40
    assert seq.stats.draft_tokens == seq.stats.rounds - 1


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_mixed_acceptance_is_lossless(target, reference, k):
    seq = pearl(target, OracleDrafter(len(PROMPT), reference), k).generate(Request(PROMPT, 40))
    assert seq.generated == reference
    assert 0 < seq.stats.accepted_tokens < seq.stats.draft_tokens


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 9, 10])
def test_max_tokens_holds(target, reference, max_tokens):
    seq = pearl(target, ModelDrafter(target, capacity=256), 8).generate(Request(PROMPT, max_tokens))
    assert seq.generated == reference[:max_tokens] and seq.finish_reason == "length"


def test_stops_at_eos_where_plain_decoding_does(target, reference):
    stop = frozenset({reference[11]})
    expected = plain(target, stop=stop)
    seq = pearl(target, ModelDrafter(target, capacity=256), 3).generate(Request(PROMPT, 40, stop_ids=stop))
    assert seq.generated == expected and seq.finish_reason == "stop"


def test_target_kv_after_every_round_equals_a_fresh_prefill(target):
    engine = pearl(target, ModelDrafter(tiny_model("llama", seed=7), capacity=256), 4)
    seq = engine.add(Request(PROMPT, 30))
    while not seq.finished:
        engine.step([seq])
        committed = seq.tokens
        nxt = engine.target.score([seq.slot], [[committed[-1]]])[0]
        engine.target.truncate(seq.slot, len(committed) - 1)
        fresh = LocalTarget(target, capacity=256)
        slot = fresh.acquire()
        fresh.prefill(slot, committed[:-1])
        assert torch.equal(nxt, fresh.score([slot], [[committed[-1]]])[0])
    engine.release(seq)
    assert engine.target.cache.slots_in_use == 0 and engine.drafter.cache.slots_in_use == 0


def test_several_sequences_in_one_round_match_each_alone(target):
    prompts = [PROMPT, PROMPT[:4], [7, 8, 9, 10, 11, 12, 13]]
    alone = [plain(target, p, max_tokens=20) for p in prompts]
    engine = pearl(target, ModelDrafter(tiny_model("llama", seed=7), num_slots=3, capacity=256), 3, slots=3)
    seqs = [engine.add(Request(p, 20)) for p in prompts]
    while any(not s.finished for s in seqs):
        engine.step([s for s in seqs if not s.finished])
    assert [s.generated for s in seqs] == alone


def test_a_plain_round_drops_the_window_and_stays_lossless(target, reference):
    engine = pearl(target, ModelDrafter(target, capacity=256), 3)
    seq = engine.add(Request(PROMPT, 40))
    for i in range(40):
        if seq.finished:
            break
        engine.step([seq], speculate=i % 3 != 2)  # every third round the gate says plain
        if i % 3 == 2:
            assert engine.rounds.window(seq).tokens == []
    assert seq.generated == reference


def test_sampling_matches_the_target_distribution():
    target, draft = small_vocab_model(0), small_vocab_model(1)
    exact = exact_two_token_distribution(target)
    engine = Engine(LocalTarget(target, capacity=64), ModelDrafter(draft, capacity=64), lambda: FixedK(2),
                    Overlapped())
    counts = sampled_counts(engine, 2500)
    assert chi_square_p(counts, exact) > 1e-3
    assert chi_square_p(counts, exact_two_token_distribution(draft)) < 1e-6  # the test can tell them apart
