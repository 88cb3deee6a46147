"""Automatic prefix caching: a new sequence copies the K/V of the longest prefix another slot holds (a finished
chat turn, a live sibling choice) instead of recomputing it. Lossless means the copied K/V gives bitwise the logits a
fresh prefill gives, for the target and the draft, and output identical to an engine that never reused anything.
"""
from __future__ import annotations

import torch
from conftest import tiny_model

from outrider.runtime.kv_cache import KVCache
from outrider.runtime.prefix_cache import HeldTokens, longest_prefix
from outrider.scheduler.drafters import DraftRequest, ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget

CAPACITY = 512
TURN_1 = [(11 * i + 5) % 250 for i in range(300)]  # more than one prefill chunk


def next_logits(target: LocalTarget, slot: int, token: int) -> torch.Tensor:
    return target.score([slot], [[token]])[0]


def fresh_next_logits(model, tokens: list[int]) -> torch.Tensor:
    """The logits after `tokens` from a target that never held anything else."""
    fresh = LocalTarget(model, capacity=CAPACITY)
    slot = fresh.acquire()
    assert fresh.prefill(slot, tokens[:-1]) == 0
    return next_logits(fresh, slot, tokens[-1])


def test_held_tokens_follow_writes_rollbacks_and_tree_paths():
    held = HeldTokens(3)
    held.appended(0, [1, 2, 3])
    held.appended(0, [4, 9, 8, 7], tree=True)  # pending 4, then three tree nodes
    assert held.chains(exclude=1) == {0: [1, 2, 3]}  # uncompacted tree rows are not a chain
    held.compacted(0, 3, [0, 2])  # kept the pending row and node 1 (row 2)
    assert held.chains(exclude=1) == {0: [1, 2, 3, 4, 8]}
    held.appended(0, [5, 6], tree=True)
    held.released(0)  # a request aborted mid-round: its tree rows are cut off
    assert held.tokens[0] == [1, 2, 3, 4, 8]
    held.truncated(0, 2)
    assert longest_prefix([1, 2, 7], held.chains(exclude=2)) == (0, 2)
    assert longest_prefix([7], held.chains(exclude=2)) == (None, 0)


def test_a_second_chat_turn_reuses_the_first_and_its_logits_are_a_fresh_prefills():
    model = tiny_model("llama", seed=0)
    target = LocalTarget(model, num_slots=2, capacity=CAPACITY)
    engine = Engine(target)
    first = engine.generate(Request(TURN_1, 24))
    assert first.stats.cached_prompt_tokens == 0
    turn_2 = first.tokens + [17, 42, 99]  # the whole first turn, then the user's reply
    second = engine.add(Request(turn_2, 8))
    held = len(TURN_1) - 1 + len(first.generated)  # every committed token but the last one, which was pending
    assert second.stats.cached_prompt_tokens == held
    assert torch.equal(next_logits(target, second.slot, turn_2[-1]), fresh_next_logits(model, turn_2))


def test_output_with_reuse_equals_output_without_for_target_and_draft():
    model, draft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    shared = TURN_1[:200]

    def run(engine: Engine) -> list[list[int]]:
        return [engine.generate(Request(shared + tail, 24, SamplingParams(temperature=0.8, seed=3))).generated
                for tail in ([1, 2, 3], [1, 2, 4], [9])]

    reusing = Engine(LocalTarget(model, num_slots=2, capacity=CAPACITY), ModelDrafter(draft, 2, CAPACITY),
                     lambda: FixedK(3))
    outs = run(reusing)
    # the reference: a new engine (empty caches) for each request
    assert outs == [run(Engine(LocalTarget(model, num_slots=2, capacity=CAPACITY), ModelDrafter(draft, 2, CAPACITY),
                               lambda: FixedK(3)))[i] for i in range(3)]


def test_a_sibling_reuses_a_live_sequences_prompt():
    model = tiny_model("llama", seed=0)
    engine = Engine(LocalTarget(model, num_slots=2, capacity=CAPACITY))
    a = engine.add(Request(TURN_1, 4))
    b = engine.add(Request(TURN_1, 4))  # the second of n choices
    assert b.stats.cached_prompt_tokens == len(TURN_1) - 1
    assert torch.equal(next_logits(engine.target, b.slot, TURN_1[-1]), next_logits(engine.target, a.slot,
                                                                                    TURN_1[-1]))


def test_slots_are_evicted_least_recently_released_first():
    model = tiny_model("llama", seed=0)
    engine = Engine(LocalTarget(model, num_slots=2, capacity=CAPACITY))
    old, recent = [3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]
    engine.generate(Request(old, 2))
    engine.generate(Request(recent, 2))
    engine.generate(Request([20, 21, 22], 2))  # takes the slot `old` was in
    assert engine.add(Request(recent + [1], 2)).stats.cached_prompt_tokens >= len(recent)
    assert engine.add(Request(old + [1], 2)).stats.cached_prompt_tokens == 0


def test_the_draft_model_reuses_a_prefix_and_drafts_what_a_fresh_cache_drafts():
    draft = tiny_model("llama", seed=1)
    drafter = ModelDrafter(draft, num_slots=2, capacity=CAPACITY)
    drafter.prefill(0, TURN_1)
    drafter.release(0)
    prompt = TURN_1 + [5, 6]
    drafter.prefill(1, prompt[:-1])
    assert drafter.seqs[1].fed == prompt[:-1]
    fresh = ModelDrafter(draft, num_slots=1, capacity=CAPACITY)
    fresh.prefill(1, prompt[:-1])
    request = [DraftRequest(1, prompt, 6, SamplingParams(), None)]
    assert drafter.propose(request)[0].tokens == fresh.propose(request)[0].tokens
    copied = drafter.cache.keys[0][drafter.seqs[1].slot, :, :len(TURN_1)]
    assert torch.equal(copied, fresh.cache.keys[0][fresh.seqs[1].slot, :, :len(TURN_1)])


def test_copy_prefix_refuses_a_slot_in_use():
    cache = KVCache.allocate(tiny_model("llama").config, 2, 16, torch.float32)
    cache.acquire()
    cache.advance(0, 4)
    b = cache.acquire()
    cache.copy_prefix(0, b, 3)
    assert cache.lengths[b] == 3
    try:
        cache.copy_prefix(0, b, 3)
    except AssertionError:
        return
    raise AssertionError("copying into a slot that holds positions must be refused")
