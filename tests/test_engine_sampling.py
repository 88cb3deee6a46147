"""End to end through the engine: speculative sampling reproduces the target's own distribution."""
from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import random_state, tiny_config
from scipy.stats import chisquare

from outrider.methods.tree import TreeDrafter
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.config import ModelConfig
from outrider.runtime.loading import build_weights
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import Draft, DraftRequest, ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams, warp
from outrider.scheduler.target import LocalTarget
from outrider.scheduler.verify import DraftTree, rrs_without_replacement

VOCAB = 16
PROMPT = [3, 7, 1]
PARAMS = SamplingParams(temperature=1.0, top_k=12)


def small_vocab_model(seed: int, sharpness: float = 8.0) -> Transformer:
    cfg = tiny_config("llama") | {"vocab_size": VOCAB}
    state = random_state(cfg, seed)
    state["lm_head.weight"] = state["lm_head.weight"] * sharpness  # 8: peaked enough that drafts are accepted
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


# -- trees -----------------------------------------------------------------------------------------------------

def test_sampled_tree_drafts_through_the_engine_match_the_target_distribution(models):
    target, draft = models
    exact = exact_two_token_distribution(target)
    drafter = TreeDrafter(draft, 3, 6, capacity=64, fit_cost=False)
    engine = Engine(LocalTarget(target, capacity=64), drafter, lambda: FixedK(2))
    counts = sampled_counts(engine, 2500)
    assert chi_square_p(counts, exact) > 1e-3
    assert chi_square_p(counts, exact_two_token_distribution(draft)) < 1e-6  # the same test tells the draft apart


def one_tree_round(engine: Engine, seq, drafter: TreeDrafter, as_chain: bool = False) -> dict[tuple[int, ...], float]:
    """The exact distribution of what one round commits: the drafter's real tree, the target's rows for it as the
    engine scores them, and every accept / reject branch of verification weighted by its probability.
    as_chain: score the nodes without their tree mask (the control)."""
    [d] = drafter.propose(engine.draft_requests([seq], [2]))
    scored = Draft(d.tokens, None) if as_chain else d
    p = warp(engine.score([seq], [scored])[0], seq.request.params).double()  # [nodes + 1, V]
    children = DraftTree(torch.tensor(d.tokens), torch.tensor(d.parents), None).children()

    def below(node: int) -> dict[tuple[int, ...], float]:
        kids = children[node + 1]
        branches = rrs_without_replacement(p[node + 1], None,
                                           torch.tensor([d.tokens[c] for c in kids], dtype=torch.long))
        out: dict[tuple[int, ...], float] = defaultdict(float)
        for c, a in zip(kids, branches.child_probs.tolist()):
            for committed, pc in below(c).items():
                out[(d.tokens[c],) + committed] += a * pc
        rejected = 1.0 - float(branches.child_probs.sum())
        for y, py in enumerate(branches.residual.tolist()):
            out[(y,)] += rejected * py
        return out

    return below(-1)


def deviation_from_the_target(target: Transformer, outputs: dict[tuple[int, ...], float], horizon: int) -> float:
    """Max |P(y) − P_target(y)| over y ∈ V^horizon, where one round commits `outputs` and the target decodes on."""
    memo: dict[tuple[int, ...], np.ndarray] = {}

    def joint(prefix: tuple[int, ...], n: int) -> np.ndarray:  # P_target of the next n tokens after prefix
        if n == 0:
            return np.ones(1)
        if (prefix, n) not in memo:
            first = next_probs(target, PROMPT + list(prefix)).double().numpy()
            memo[(prefix, n)] = np.concatenate([first[a] * joint(prefix + (a,), n - 1) for a in range(VOCAB)])
        return memo[(prefix, n)]

    algorithm = np.zeros(VOCAB ** horizon)
    for committed, prob in outputs.items():
        index = sum(t * VOCAB ** (len(committed) - 1 - i) for i, t in enumerate(committed))  # among V^len
        size = VOCAB ** (horizon - len(committed))
        algorithm[index * size:(index + 1) * size] += prob * joint(committed, horizon - len(committed))
    return float(np.abs(algorithm - joint((), horizon)).max())


def test_one_tree_round_through_the_engine_commits_exactly_the_target_distribution():
    # A flatter model than the others here, drafting for itself: its tree's nodes are often accepted, so the rows
    # below them carry weight and a wrong row shows in the distribution.
    target = draft = small_vocab_model(0, sharpness=2.0)
    drafter = TreeDrafter(draft, 3, 6, capacity=64, fit_cost=False)
    engine = Engine(LocalTarget(target, capacity=64), drafter, lambda: FixedK(2))
    seq = engine.add(Request(PROMPT, 8, PARAMS))
    outputs = one_tree_round(engine, seq, drafter)
    assert sum(outputs.values()) == pytest.approx(1.0, abs=1e-6)  # float32 rows
    assert max(len(t) for t in outputs) == 3  # a whole path and the bonus token is among the outcomes
    assert deviation_from_the_target(target, outputs, horizon=3) < 1e-6
    # Control: the same nodes scored as a chain (no tree mask) see the wrong ancestors, and the check says so.
    engine.target.truncate(seq.slot, len(PROMPT) - 1)
    assert deviation_from_the_target(target, one_tree_round(engine, seq, drafter, as_chain=True), horizon=3) > 1e-3
