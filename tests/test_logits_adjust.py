"""What clients send beyond temperature: logit_bias, penalties, min_p and log-probabilities, through the engine.

Penalties depend on the tokens before a row, so a verify row must be adjusted for the drafts before it exactly as
plain decoding adjusts the row after committing them: greedy output stays plain decoding's, sampled output stays
the adjusted target's distribution, and logprobs with speculation equal logprobs without it, bitwise.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import PROMPT, plain, tiny_model
from scipy.stats import chisquare
from test_engine_sampling import VOCAB, small_vocab_model

from outrider.methods.tree import TreeDrafter
from outrider.runtime.batch import ForwardBatch
from outrider.scheduler.drafters import ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams, adjust, log_probs, warp
from outrider.scheduler.target import PREFILL_CHUNK, LocalTarget

CAPACITY = 512
PENALISED = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.4,
                           logit_bias=((5, 3.0), (9, -100.0)))


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", seed=1)


def fresh_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] the model's logits after each prefix, from an empty cache."""
    cache = model.new_cache(1, CAPACITY)
    return model.forward(ForwardBatch.chain([0], [tokens], [0]), cache).logits


# -- the adjustments themselves ------------------------------------------------------------------------------


def test_penalties_follow_the_openai_and_hf_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0,
                            logit_bias=((4, 10.0),))
    out = adjust(logits, params, prompt=[2], generated=[0, 0, 1])[0]
    # token 0: seen twice in the output → 2/2 − 0.5·2 − 0.25; token 1: once, negative → −1·2 − 0.5 − 0.25;
    # token 2: in the prompt only → 0.5/2 (no frequency/presence: the prompt was not generated); token 3 unseen;
    # token 4: bias first, then unseen
    assert out.tolist() == pytest.approx([1 - 1 - 0.25, -2 - 0.5 - 0.25, 0.25, 3.0, 8.0])


def test_each_row_is_penalised_for_the_drafts_before_it_only():
    logits = torch.zeros(3, 4)
    out = adjust(logits, SamplingParams(frequency_penalty=1.0), [], [1], extra=[[], [2], [2, 2]])
    assert out.tolist() == [[0, -1, 0, 0], [0, -1, -1, 0], [0, -1, -2, 0]]


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = warp(logits, SamplingParams(temperature=1.0, min_p=0.31))[0]
    assert kept.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    assert torch.equal(warp(logits, SamplingParams(temperature=1.0, min_p=0.0)), warp(logits, SamplingParams(1.0)))


@pytest.mark.parametrize("field,value", [("min_p", 1.5), ("frequency_penalty", 2.5), ("presence_penalty", -3.0),
                                         ("repetition_penalty", 0.0), ("logit_bias", ((3, 101.0),))])
def test_out_of_range_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_the_engine_refuses_a_bias_outside_the_vocabulary_and_too_many_alternatives(target):
    engine = Engine(LocalTarget(target, capacity=CAPACITY))
    with pytest.raises(ValueError, match="logit_bias token id"):
        engine.validate(Request(PROMPT, 4, SamplingParams(logit_bias=((10**6, 1.0),))))
    with pytest.raises(ValueError, match="logprobs must be in 0..20"):
        engine.validate(Request(PROMPT, 4, logprobs=21))


# -- greedy: speculation still gives plain decoding's tokens ---------------------------------------------------


def test_penalised_greedy_output_is_plain_decodings_with_a_draft_chain_and_a_tree(target, draft):
    reference = plain(target, max_tokens=48, params=PENALISED)
    assert reference != plain(target, max_tokens=48), "control: the penalties must change this output"
    assert 9 not in reference, "a token biased by -100 is never chosen"
    chain = Engine(LocalTarget(target, capacity=CAPACITY), ModelDrafter(draft, capacity=CAPACITY), lambda: FixedK(4))
    tree = Engine(LocalTarget(target, capacity=CAPACITY), TreeDrafter(draft, 2, 8, capacity=CAPACITY, fit_cost=False),
                  lambda: FixedK(4), verify_rows=17)
    for engine in (chain, tree):
        out = engine.generate(Request(PROMPT, 48, PENALISED))
        assert out.generated == reference
        assert out.stats.draft_tokens > out.stats.rounds  # it did speculate


def test_a_draft_that_is_the_target_is_penalised_like_it_and_never_rejected(target):
    """The draft's rows get the same adjustment as the target's, so a draft model equal to the target proposes
    exactly the penalised greedy tokens."""
    engine = Engine(LocalTarget(target, capacity=CAPACITY), ModelDrafter(target, capacity=CAPACITY),
                    lambda: FixedK(4))
    out = engine.generate(Request(PROMPT, 40, PENALISED))
    assert out.generated == plain(target, max_tokens=40, params=PENALISED)
    assert out.stats.accepted_tokens == out.stats.draft_tokens


# -- sampled: the adjusted target's exact distribution ---------------------------------------------------------

SAMPLED = SamplingParams(temperature=1.0, min_p=0.02, presence_penalty=1.5, repetition_penalty=1.2,
                         logit_bias=((4, 2.0),))
SHORT_PROMPT = [3, 7, 1]


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of `counts` against `probs`, the cells expecting fewer than 5 draws pooled into one."""
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if (~big).any():
        obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    if (exp == 0).any():
        return 0.0 if obs[exp == 0].sum() else chisquare(obs[exp > 0], exp[exp > 0]).pvalue
    return chisquare(obs, exp).pvalue


def exact_pairs(model, params: SamplingParams) -> np.ndarray:
    """P(t1, t2 | prompt) of the adjusted, warped target by enumeration: [VOCAB²]."""
    def nxt(generated: list[int]) -> torch.Tensor:
        logits = fresh_logits(model, SHORT_PROMPT + generated)[-1:]
        return warp(adjust(logits, params, SHORT_PROMPT, generated), params)[0].double()

    first = nxt([])
    return np.array([(first[a] * nxt([a])[b]).item() for a, b in itertools.product(range(VOCAB), range(VOCAB))])


def test_speculative_sampling_with_penalties_gives_the_penalised_distribution():
    target, draft = small_vocab_model(0), small_vocab_model(1)
    engine = Engine(LocalTarget(target, capacity=64), ModelDrafter(draft, capacity=64), lambda: FixedK(2))
    counts = np.zeros(VOCAB * VOCAB)
    for seed in range(2500):
        params = SamplingParams(**{**SAMPLED.__dict__, "seed": seed})
        out = engine.generate(Request(SHORT_PROMPT, 2, params))
        counts[out.generated[0] * VOCAB + out.generated[1]] += 1
    assert chi_square_p(counts, exact_pairs(target, SAMPLED)) > 1e-3
    # control: the same test tells the unadjusted target apart
    assert chi_square_p(counts, exact_pairs(target, SamplingParams(temperature=1.0))) < 1e-6


# -- logprobs --------------------------------------------------------------------------------------------------


def test_logprobs_with_speculation_equal_logprobs_without_it_bitwise(target, draft):
    """With the target as its own draft every draft is accepted (logprobs read from rows 1..k of wide verifies);
    with another model most are rejected (read from recovered positions)."""
    request = Request(PROMPT, 40, PENALISED, logprobs=5)
    alone = Engine(LocalTarget(target, capacity=CAPACITY)).generate(request)
    assert [lp.token for lp in alone.logprobs] == alone.generated
    for model in (target, draft):
        spec = Engine(LocalTarget(target, capacity=CAPACITY), ModelDrafter(model, capacity=CAPACITY),
                      lambda: FixedK(4)).generate(request)
        assert spec.stats.draft_tokens > spec.stats.rounds
        assert spec.generated == alone.generated
        assert spec.logprobs == alone.logprobs  # floats compared exactly


def test_logprobs_are_the_adjusted_targets_log_distribution_at_the_request_temperature(target, draft):
    params = SamplingParams(temperature=0.7, seed=3, frequency_penalty=0.5)
    out = Engine(LocalTarget(target, capacity=CAPACITY), ModelDrafter(draft, capacity=CAPACITY),
                 lambda: FixedK(3)).generate(Request(PROMPT, 12, params, logprobs=3))
    tokens = PROMPT + out.generated
    logits = fresh_logits(target, tokens[:-1])[len(PROMPT) - 1:]  # row i chose generated[i]
    for i, lp in enumerate(out.logprobs):
        row = log_probs(adjust(logits[i:i + 1], params, PROMPT, out.generated[:i]), params)[0]
        assert lp.logprob == pytest.approx(row[lp.token].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert math.exp(lp.logprob) <= 1.0


def test_prompt_logprobs_score_each_prompt_token_and_leave_generation_unchanged(target):
    prompt = [(7 * i + 3) % 200 for i in range(PREFILL_CHUNK + 40)]  # more than one scoring chunk
    engine = Engine(LocalTarget(target, capacity=CAPACITY))
    out = engine.generate(Request(prompt, 8, prompt_logprobs=2))
    reference = Engine(LocalTarget(target, capacity=CAPACITY)).generate(Request(prompt, 8)).generated
    assert out.generated == reference  # the scored prefill wrote the K/V a prefill writes
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    expected = torch.log_softmax(fresh_logits(target, prompt[:-1]), -1)  # row j scores prompt[j + 1]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    assert torch.allclose(got, expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=1e-5)
    assert all(len(lp.top) == 2 for lp in out.prompt_logprobs[1:])
