"""End to end through the engine: speculative sampling reproduces the target's own distribution."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import random_state, tiny_config
from outrider.runtime.config import ModelConfig
from outrider.runtime.loading import build_weights
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import ModelDrafter
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


def exact_two_token_distribution(model: Transformer) -> np.ndarray:
    """P(t1, t2 | PROMPT) under the warped target, by enumeration: [VOCAB * VOCAB]."""
    def next_probs(tokens: list[int]) -> torch.Tensor:
        cache = model.new_cache(1, 64)
        logits = model.forward(ForwardBatch.chain([0], [tokens], [0]), cache).logits[-1]
        return warp(logits[None], PARAMS)[0].double()

    first = next_probs(PROMPT)
    return np.array([(first[a] * next_probs(PROMPT + [a])[b]).item()
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
