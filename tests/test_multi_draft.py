"""Multi-draft speculative sampling: each draft scheme with its verifier keeps the target's distribution exactly
(enumerated), the optimal-transport bound equals the primal LP and no verifier beats it, and the served method
is lossless through the engine (greedy token for token, sampled by chi-square with a control)."""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import PROMPT, in_process, plain, random_state, tiny_config, tiny_model
from pydantic import ValidationError
from scipy.optimize import linprog
from scipy.stats import chisquare
from test_engine_sampling import chi_square_p
from test_trees import CAPACITY, decode_checking_both_caches

import outrider.scheduler.verify as verify
from outrider.methods import METHODS
from outrider.methods.multi_draft import MultiDraftDrafter, MultiDraftOptions
from outrider.methods.multi_draft.bound import all_in_without_replacement, optimal_acceptance
from outrider.methods.multi_draft.schemes import SCHEMES, VERIFIERS
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.config import ModelConfig
from outrider.runtime.loading import build_weights
from outrider.runtime.model import Transformer
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams, warp
from outrider.scheduler.target import LocalTarget

Rule = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], verify.LevelBranches]


# -- every draft multiset, every verifier, exactly --------------------------------------------------------------

def draft_law(q: np.ndarray, n: int, sampling: str) -> list[tuple[tuple[int, ...], float]]:
    """Every ordered draft tuple the scheme can draw from q, with its probability."""
    vocab = len(q)
    if sampling == "with-replacement":
        return [(t, float(np.prod(q[list(t)]))) for t in itertools.product(range(vocab), repeat=n)]
    if sampling == "without-replacement":
        law = []
        for t in itertools.permutations(range(vocab), n):
            prob, left = 1.0, 1.0
            for x in t:
                prob, left = prob * q[x] / left, left - q[x]
            law.append((t, prob))
        return law
    top = tuple(int(i) for i in np.argsort(-q, kind="stable")[:n - 1])
    rest = q.copy()
    rest[list(top)] = 0.0
    return [(top + (x,), rest[x] / rest.sum()) for x in range(vocab) if rest[x] > 0]


def level_outcome(rule: Rule, p: np.ndarray, q: np.ndarray, drafts: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """(P(out = y) for every y, P(out is one of the drafts)) of one level given its drafts."""
    b = rule(torch.tensor(p), torch.tensor(q), torch.tensor(drafts))
    child = b.child_probs.numpy()
    out = (1.0 - child.sum()) * b.residual.numpy()
    for c, a in zip(drafts, child):
        out[c] += a
    return out, float(child.sum())


def enumerate_level(rule: Rule, p: np.ndarray, q: np.ndarray, n: int, sampling: str) -> tuple[np.ndarray, float]:
    """The output distribution and acceptance of a verifier over every draft tuple of the scheme."""
    dist, accept = np.zeros_like(p), 0.0
    for drafts, prob in draft_law(q, n, sampling):
        if prob > 0:
            out, a = level_outcome(rule, p, q, drafts)
            dist += prob * out
            accept += prob * a
    return dist, accept


def instances(vocab: int, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random (p, q): independent Dirichlet draws, and q a noisy copy of p's logits (a draft that agrees)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 2:
            logits = rng.normal(size=vocab) * 2
            p, q = np.exp(logits), np.exp(logits + rng.normal(size=vocab))
        else:
            p, q = rng.dirichlet(np.ones(vocab) * 0.7), rng.dirichlet(np.ones(vocab) * 0.7)
        out.append((p / p.sum(), q / q.sum()))
    return out


@pytest.mark.parametrize("sampling", list(SCHEMES))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_each_scheme_and_its_verifier_output_exactly_the_target_distribution(sampling, n):
    rule = VERIFIERS[SCHEMES[sampling].verifier]
    for p, q in instances(6, 6, seed=n):
        dist, accept = enumerate_level(rule, p, q, n, sampling)
        assert np.abs(dist - p).max() < 1e-9
        bound = optimal_acceptance(p, q, n, sampling)
        assert bound.tail == 0.0 and accept <= bound.value + 1e-12  # no verifier beats the bound
        if sampling == "greedy":
            assert accept == pytest.approx(bound.value, abs=1e-12)  # the greedy-draft verifier reaches it


def broken_rrs_without_renormalising(p, q, tokens):
    """RRS without replacement whose q_{j+1} has the draft zeroed but is not renormalised."""
    accept = []
    for x in tokens:
        accept.append(verify.acceptance_prob(p, q, x))
        p = verify.residual(p, q)
        q = q.scatter(-1, x.unsqueeze(-1), 0.0)
    return verify._sequential(accept, p)


@pytest.mark.parametrize("rule, sampling", [
    (broken_rrs_without_renormalising, "without-replacement"),
    (verify.rrs_without_replacement, "with-replacement"),  # drafts with replacement, verified as if without
    (verify.rrs_with_replacement, "without-replacement"),
    (verify.rrs_without_replacement, "greedy"),
], ids=["forgets-to-renormalise", "with-fed-to-without", "without-fed-to-with", "greedy-fed-to-rrs"])
def test_control_a_broken_or_mismatched_verifier_is_caught(rule, sampling):
    deviation = max(np.abs(enumerate_level(rule, p, q, 3, sampling)[0] - p).max()
                    for p, q in instances(6, 6, seed=11))
    assert deviation > 1e-3


# -- the optimal transport bound ---------------------------------------------------------------------------------

def primal_lp(p: np.ndarray, q: np.ndarray, n: int, sampling: str) -> float:
    """max P(Y ∈ S) over couplings of Y ~ p and S ~ Q, by scipy's LP solver (independent of the dual scan)."""
    law = [(set(t), w) for t, w in draft_law(q, n, sampling) if w > 0]
    vocab, m = len(p), len(law)
    cost = -np.array([float(y in s) for y in range(vocab) for s, _ in law])  # variable (y, s) at y * m + s
    rows, rhs = [], []
    for y in range(vocab):
        row = np.zeros(vocab * m)
        row[y * m:(y + 1) * m] = 1
        rows.append(row), rhs.append(p[y])
    for j, (_, w) in enumerate(law):
        row = np.zeros(vocab * m)
        row[j::m] = 1
        rows.append(row), rhs.append(w)
    res = linprog(cost, A_eq=np.array(rows), b_eq=np.array(rhs), bounds=(0, None), method="highs")
    assert res.status == 0
    return -res.fun


def every_subset_cut(p: np.ndarray, q: np.ndarray, n: int, sampling: str) -> float:
    """min over all 2^V token sets T of p(T) + 1 − Q(S ⊆ T)."""
    law = [(set(t), w) for t, w in draft_law(q, n, sampling)]
    vocab = len(p)
    return min(p[list(t)].sum() + 1.0 - sum(w for s, w in law if s <= set(t))
               for size in range(vocab + 1) for t in itertools.combinations(range(vocab), size))


@pytest.mark.parametrize("sampling", list(SCHEMES))
@pytest.mark.parametrize("n", [2, 3])
def test_the_dual_bound_equals_the_primal_lp_and_every_subset_cut(sampling, n):
    for p, q in instances(5, 6, seed=20 + n):
        bound = optimal_acceptance(p, q, n, sampling).value
        assert bound == pytest.approx(primal_lp(p, q, n, sampling), abs=1e-6)
        assert bound == pytest.approx(every_subset_cut(p, q, n, sampling), abs=1e-9)


def test_without_replacement_draws_all_in_a_set_as_enumeration_says():
    for p, q in instances(6, 4, seed=5):
        order = np.argsort(p / q)
        for n in (1, 2, 3):
            exact = [sum(w for t, w in draft_law(q[order], n, "without-replacement") if max(t) < k)
                     for k in range(7)]
            assert np.abs(all_in_without_replacement(q[order], n) - exact).max() < 1e-9


def test_without_replacement_has_the_higher_optimum_and_a_cut_vocabulary_stays_within_its_tail():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=400) * 3
    p, q = np.exp(logits), np.exp(logits + rng.normal(size=400))
    p, q = p / p.sum(), q / q.sum()
    with_r, without = (optimal_acceptance(p, q, 3, s).value for s in ("with-replacement", "without-replacement"))
    assert without > with_r + 1e-3
    cut = optimal_acceptance(p, q, 3, "without-replacement", support=60)
    assert 0 < cut.tail < 0.5 and abs(cut.value - without) <= cut.tail


# -- the samplers draw what the verifiers assume ------------------------------------------------------------------

@pytest.mark.parametrize("sampling", list(SCHEMES))
def test_each_sampler_draws_its_scheme_law(sampling):
    q = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    law = dict(draft_law(q, 2, sampling))
    gen = torch.Generator().manual_seed(0)
    draws = Counter(tuple(SCHEMES[sampling].draw(torch.tensor(q), 2, gen).tolist()) for _ in range(4000))
    cells = sorted(law)
    assert set(draws) <= set(cells)
    assert chisquare([draws[c] for c in cells], [4000 * law[c] for c in cells]).pvalue > 1e-3
    # control: the draws are far from another scheme's law (total variation), so the test above can fail
    other = dict(draft_law(q, 2, "with-replacement" if sampling == "without-replacement" else "without-replacement"))
    assert 0.5 * sum(abs(draws[c] / 4000 - other.get(c, 0.0)) for c in set(other) | set(cells)) > 0.1


# -- served: through the engine --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", seed=7)


def test_options_refuse_a_verifier_that_is_not_exact_for_the_sampling_and_trees_too_wide():
    with pytest.raises(ValidationError, match="strategy.verifier: rrs is not lossless .* greedy-draft"):
        MultiDraftOptions(sampling="greedy", verifier="rrs")
    with pytest.raises(ValidationError, match="strategy.drafts: .* 20 nodes, above 16"):
        MultiDraftOptions(drafts=4, k=5)
    assert MultiDraftOptions(sampling="greedy", verifier="greedy-draft").rule == "greedy-draft"


@pytest.mark.parametrize("sampling", list(SCHEMES))
def test_greedy_requests_give_the_target_tokens_and_both_caches_stay_exact(target, reference, draft, sampling):
    drafter = MultiDraftDrafter(draft, 3, 2, sampling, capacity=CAPACITY)
    engine, seq = decode_checking_both_caches(target, drafter, 3)
    assert seq.generated == reference
    assert seq.stats.drafts_per_position[:3] == [3.0, 6.0, 6.0]  # every node drafted: 3, then 3 under 2 nodes


@pytest.mark.parametrize("sampling", list(SCHEMES))
def test_the_method_serves_sampled_batches_reproducibly_and_greedy_like_plain(target, draft, sampling):
    env = in_process(target, draft, slots=2)
    options = MultiDraftOptions(k=3, drafts=3, sampling=sampling)
    parts = METHODS[options.name].parts(options, env)
    engine = Engine(env.target, parts.drafter, parts.policy, parts.rounds, parts.verify_rows, parts.sibling_rule)
    assert parts.sibling_rule is VERIFIERS[SCHEMES[sampling].verifier]
    hot = SamplingParams(temperature=1.0, seed=4)
    first, second = (engine.generate(Request(PROMPT, 24, hot)) for _ in range(2))
    assert first.generated == second.generated and first.stats.drafts_per_position[:3] == [3.0, 3.0, 3.0]
    assert engine.generate(Request(PROMPT, 24)).generated == plain(target, PROMPT, max_tokens=24)


VOCAB = 256
TWO = SamplingParams(temperature=1.0)


def model_of_vocab(sharpness: float, noise: float = 0.0) -> Transformer:
    """A random model of VOCAB tokens; with `noise`, its head perturbed (a draft that mostly agrees)."""
    cfg = tiny_config("llama") | {"vocab_size": VOCAB}
    state = random_state(cfg, 0)
    head = state["lm_head.weight"]
    state["lm_head.weight"] = (head + noise * torch.randn(head.shape, generator=torch.Generator().manual_seed(1))
                               * head.std()) * sharpness
    config = ModelConfig.from_hf(cfg)
    return Transformer(config, build_weights(config, state.__getitem__, torch.float32, "dense",
                                             torch.device("cpu")), torch.float32)


def next_probs(model: Transformer, tokens: list[int]) -> np.ndarray:
    cache = model.new_cache(1, 64)
    logits = model.forward(ForwardBatch.chain([0], [tokens], [0]), cache).logits[-1]
    return warp(logits[None], TWO)[0].double().numpy()


def two_tokens(model: Transformer, prompt: list[int]) -> np.ndarray:
    """P(t1, t2 | prompt) by enumeration: [VOCAB * VOCAB]."""
    first = next_probs(model, prompt)
    return np.concatenate([first[a] * next_probs(model, prompt + [a]) for a in range(VOCAB)])


@pytest.fixture(scope="module")
def vocab_256():
    target, draft = model_of_vocab(3.0), model_of_vocab(3.0, noise=0.5)
    return target, draft, two_tokens(target, [3, 7, 1]), two_tokens(draft, [3, 7, 1])


def engine_counts(target: Transformer, draft: Transformer, sampling: str, rule: Rule) -> tuple[np.ndarray, float]:
    """Two sampled tokens 2,500 times (the first round drafts n tokens at one position): their counts, and the
    mean draft tokens accepted."""
    engine = Engine(LocalTarget(target, capacity=64), MultiDraftDrafter(draft, 3, 1, sampling, capacity=64),
                    lambda: FixedK(2), verify_rows=17, sibling_rule=rule)
    counts, accepted = np.zeros(VOCAB * VOCAB), 0
    for seed in range(2500):
        out = engine.generate(Request([3, 7, 1], 2, SamplingParams(1.0, seed=seed)))
        counts[out.generated[0] * VOCAB + out.generated[1]] += 1
        accepted += out.stats.accepted_tokens
    return counts, accepted / 2500


@pytest.mark.parametrize("sampling", list(SCHEMES))
def test_sampled_multi_drafts_through_the_engine_match_the_target_at_vocab_256(vocab_256, sampling):
    target, draft, exact, draft_dist = vocab_256
    counts, accepted = engine_counts(target, draft, sampling, VERIFIERS[SCHEMES[sampling].verifier])
    assert accepted > 0.5  # the drafts decide most outputs, so a wrong rule would show
    assert chi_square_p(counts, exact) > 1e-3
    assert chi_square_p(counts, draft_dist) < 1e-6  # control: the same test tells the draft's distribution apart


def test_control_greedy_drafts_verified_as_sampled_ones_are_caught_through_the_engine(vocab_256):
    target, draft, exact, _ = vocab_256
    counts, _ = engine_counts(target, draft, "greedy", verify.rrs_without_replacement)
    assert chi_square_p(counts, exact) < 1e-6
