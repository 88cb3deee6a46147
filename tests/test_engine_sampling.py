"""End to end through the engine: speculative sampling reproduces the target's own distribution."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import random_state, tiny_config
from scipy.stats import chisquare

from outrider.runtime.batch import ForwardBatch
from outrider.runtime.config import ModelConfig
from outrider.runtime.loading import build_weights
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import Draft, DraftRequest, ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams, warp
from outrider.scheduler.target import LocalTarget

VOCAB = 16
PROMPT = [3, 7, 1]
PARAMS = SamplingParams(temperature=1.0, top_k=12)


def small_vocab_model(seed: int) -> Transformer:
    cfg = tiny_config("llama") | {"vocab_size": VOCAB}
    state = random_state(cfg, seed)
    state["lm_head.weight"] = state["lm_head.weight"] * 8  # peaked enough that drafts are sometimes accepted
    config = ModelConfig.from_hf(cfg)
    return Transformer(config, build_weights(config, state.__getitem__, torch.float32, "dense",
                                             torch.device("cpu")), torch.float32)


def next_probs(model: Transformer, tokens: list[int], params: SamplingParams = PARAMS) -> torch.Tensor:
    """The model's warped distribution of the token after `tokens`, from a fresh cache: [VOCAB]."""
    cache = model.new_cache(1, 64)
    logits = model.forward(ForwardBatch.chain([0], [tokens], [0]), cache).logits[-1]
    return warp(logits[None], params)[0]


def exact_two_token_distribution(model: Transformer) -> np.ndarray:
    """P(t1, t2 | PROMPT) under the warped target, by enumeration: [VOCAB * VOCAB]."""
    first = next_probs(model, PROMPT).double()
    return np.array([(first[a] * next_probs(model, PROMPT + [a]).double()[b]).item()
                     for a, b in itertools.product(range(VOCAB), range(VOCAB))])


def sampled_counts(engine: Engine, n: int) -> np.ndarray:
    counts = np.zeros(VOCAB * VOCAB)
    for seed in range(n):
        out = engine.generate(Request(PROMPT, 2, SamplingParams(PARAMS.temperature, PARAMS.top_k, seed=seed)))
        counts[out.generated[0] * VOCAB + out.generated[1]] += 1
    return counts


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return chisquare(obs, exp).pvalue


@pytest.fixture(scope="module")
def models():
    return small_vocab_model(0), small_vocab_model(1)


def test_speculative_sampling_matches_the_target_distribution(models):
    target, draft = models
    exact = exact_two_token_distribution(target)
    engine = Engine(LocalTarget(target, capacity=64), ModelDrafter(draft, capacity=64), lambda: FixedK(2))
    counts = sampled_counts(engine, 2500)
    assert chi_square_p(counts, exact) > 1e-3
    # Negative control: the draft's own distribution is told apart by the same test.
    assert chi_square_p(counts, exact_two_token_distribution(draft)) < 1e-6


class TargetRowsAsQ(ModelDrafter):
    """A broken drafter: it draws its tokens from the draft model but reports the target's own rows as q, so
    min(1, p(x) / q(x)) is 1 and every draft is accepted, whatever the target thinks of it."""

    def __init__(self, draft: Transformer, target: Transformer, capacity: int):
        super().__init__(draft, capacity=capacity)
        self.target = target

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = super().propose(requests)
        return [Draft(d.tokens, None if d.probs is None else torch.stack(
                    [next_probs(self.target, r.tokens + d.tokens[:i], r.params) for i in range(len(d.tokens))]))
                for r, d in zip(requests, drafts)]


def test_control_an_engine_verifying_with_the_wrong_q_rows_is_caught(models):
    """Control that breaks the engine, not the reference: verification handed q rows other than those the draft
    sampled from accepts the draft's tokens unchecked, and the same chi-square against the exact target
    distribution rejects the output. A tenth of the samples is plenty: this output is nowhere near the target's.
    (Uniform q rows would not be caught with these models: the target puts 0.9999 on one pair, which is then
    also what the residual max(0, p - q) gives, so the output barely moves.)"""
    target, draft = models
    engine = Engine(LocalTarget(target, capacity=64), TargetRowsAsQ(draft, target, capacity=64), lambda: FixedK(2))
    counts = sampled_counts(engine, 250)
    assert chi_square_p(counts, exact_two_token_distribution(target)) < 1e-6
