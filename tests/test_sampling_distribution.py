"""Losslessness: one round of draft-then-verify, followed by plain target decoding, is distributed exactly like
plain target decoding from the warped target.

1. Exact enumeration on a tiny vocabulary. Every draft the drafter can produce, weighted by its probability, times
   the branch probabilities of the verifier: `chain_branches` / `rrs_without_replacement`, the very tensors verify_chain
   and verify_tree sample from. The sum is the algorithm's exact output distribution; it must equal the
   target's to 1e-6, for sampled and deterministic drafts, chains and trees, under every warp.
2. Chi-square at V = 256 on seeded runs of verify_chain and verify_tree themselves, with negative controls:
   a deliberately wrong rule must fail the same test.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
import torch
from scipy.stats import chisquare
from torch import Tensor

from outrider.scheduler import verify
from outrider.scheduler.sampling import SamplingParams, sample, warp
from outrider.scheduler.verify import DraftTree, chain_branches, rrs_without_replacement, verify_chain, verify_tree

Outputs = dict[tuple[int, ...], float]  # the tokens one round commits → their probability

VOCAB = 8
WARPS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=0.9, top_p=0.7),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.85),
    SamplingParams(temperature=0.0),
]
WARP_IDS = ["t1", "t0.6", "topk3", "topp0.7", "topk5-topp0.85", "greedy"]


class TableLM:
    """A tiny autoregressive model: fixed next-token logits for every prefix shorter than len(tables).
    tables[t] has shape (V,) * (t + 1): index it with a length-t prefix to get the [V] logits of token t."""

    def __init__(self, tables: list[Tensor]) -> None:
        self.tables = tables

    @classmethod
    def random(cls, max_len: int, seed: int) -> TableLM:
        g = torch.Generator().manual_seed(seed)
        return cls([2.0 * torch.randn((VOCAB,) * (t + 1), generator=g) for t in range(max_len)])

    def perturbed(self, seed: int) -> TableLM:
        """A draft model: correlated with this one, but different."""
        g = torch.Generator().manual_seed(seed)
        return TableLM([0.5 * t + 1.5 * torch.randn(t.shape, generator=g) for t in self.tables])

    def probs(self, prefix: tuple[int, ...], params: SamplingParams) -> Tensor:
        return warp(self.tables[len(prefix)][prefix], params)  # [V]


# ------------------------------------------------------------------------------------------------ the reference


def continuation(target: TableLM, params: SamplingParams, prefix: tuple[int, ...], horizon: int) -> Tensor:
    """P_target(y_m .. y_{horizon-1} | prefix) as a (V,) * (horizon − m) float64 tensor, m = len(prefix)."""
    out = torch.ones((), dtype=torch.float64)
    for t in range(len(prefix), horizon):
        out = out.unsqueeze(-1) * warp(target.tables[t][prefix], params).double()  # warp is per row
    return out


def deviation_from_target(outputs: Outputs, target: TableLM, params: SamplingParams, horizon: int) -> float:
    """Max |P_alg(y) − P_target(y)| over y ∈ V^horizon, where the algorithm commits one round's tokens and the
    target decodes the rest."""
    algorithm = torch.zeros((VOCAB,) * horizon, dtype=torch.float64)
    for committed, prob in outputs.items():
        algorithm[committed] += prob * continuation(target, params, committed, horizon)
    expected = continuation(target, params, (), horizon)
    return float((algorithm - expected).abs().max())


# ------------------------------------------------------------------------------------------------ chains


def sampled_chains(draft: TableLM, params: SamplingParams, k: int) -> Iterator[tuple[tuple[int, ...], float, Tensor]]:
    """Every chain a sampling drafter can propose: (tokens, probability, q rows [k, V])."""

    def grow(prefix: tuple[int, ...], prob: float, rows: list[Tensor]) -> Iterator:
        if len(prefix) == k:
            yield prefix, prob, torch.stack(rows)
            return
        q = draft.probs(prefix, params)
        for x in torch.nonzero(q).flatten().tolist():
            yield from grow(prefix + (x,), prob * float(q[x]), rows + [q])

    yield from grow((), 1.0, [])


def chain_round(target: TableLM, params: SamplingParams, drafts: tuple[int, ...], q_rows: Tensor | None) -> Outputs:
    """Exact distribution of what verify_chain commits for these drafts."""
    k = len(drafts)
    p_rows = torch.stack([target.probs(drafts[:i], params) for i in range(k + 1)])  # [k+1, V]
    branches = chain_branches(p_rows, torch.tensor(drafts, dtype=torch.int64), q_rows)
    accept, extra = branches.accept_probs.tolist(), branches.extra_probs.tolist()
    out: Outputs = defaultdict(float)
    reach = 1.0  # P(the first j drafts are accepted)
    for j in range(k + 1):
        stop = reach * (1.0 - accept[j] if j < k else 1.0)  # P(exactly j accepted)
        for y, py in enumerate(extra[j]):  # then the recovered (j < k) or bonus (j = k) token
            out[drafts[:j] + (y,)] += stop * py
        if j < k:
            reach *= accept[j]
    return out


def sampled_chain_outputs(target: TableLM, draft: TableLM, params: SamplingParams, k: int) -> Outputs:
    out: Outputs = defaultdict(float)
    for drafts, prob, q_rows in sampled_chains(draft, params, k):
        for committed, p in chain_round(target, params, drafts, q_rows).items():
            out[committed] += prob * p
    return out


@pytest.mark.parametrize("params", WARPS, ids=WARP_IDS)
@pytest.mark.parametrize("k", [2, 3])
def test_chain_of_sampled_drafts_commits_exactly_the_target_distribution(params: SamplingParams, k: int) -> None:
    target = TableLM.random(k + 1, seed=k)
    outputs = sampled_chain_outputs(target, target.perturbed(seed=10 + k), params, k)
    assert sum(outputs.values()) == pytest.approx(1.0, abs=1e-6)
    assert deviation_from_target(outputs, target, params, horizon=k + 1) < 1e-6


@pytest.mark.parametrize("params", WARPS, ids=WARP_IDS)
@pytest.mark.parametrize("k", [2, 3])
def test_chain_of_deterministic_drafts_commits_exactly_the_target_distribution(params: SamplingParams, k: int) -> None:
    """q = point mass: a greedy draft model's chain, and arbitrary fixed chains (as an n-gram drafter proposes)."""
    target = TableLM.random(k + 1, seed=k)
    draft = target.perturbed(seed=10 + k)
    greedy_chain: tuple[int, ...] = ()
    for _ in range(k):
        greedy_chain += (int(draft.tables[len(greedy_chain)][greedy_chain].argmax()),)
    g = torch.Generator().manual_seed(20 + k)
    fixed = [tuple(torch.randint(VOCAB, (k,), generator=g).tolist()) for _ in range(2)]
    for drafts in [greedy_chain, *fixed]:
        outputs = chain_round(target, params, drafts, None)
        assert deviation_from_target(outputs, target, params, horizon=k + 1) < 1e-6


# ------------------------------------------------------------------------------------------------ trees

BRANCHING = (3, 2)  # the root gets 3 children, each of them 2 children: n = 9 nodes, depth 2


def sibling_sets(
    draft: TableLM, params: SamplingParams, prefix: tuple[int, ...], m: int, sampled: bool
) -> Iterator[tuple[tuple[int, ...], float, Tensor | None]]:
    """Every ordered set of children a drafter can propose below `prefix`: (tokens, probability, q or None).
    Sampled: m draws from q without replacement (fewer when q's support is smaller). Deterministic: top-m."""
    logits = draft.tables[len(prefix)][prefix]
    if not sampled:
        yield tuple(logits.topk(m).indices.tolist()), 1.0, None
        return
    q = draft.probs(prefix, params)
    support = torch.nonzero(q).flatten().tolist()
    for kids in itertools.permutations(support, min(m, len(support))):
        prob, left = 1.0, float(q.double().sum())
        for c in kids:  # P(c_1) P(c_2 | c_1) ...: each draw renormalises over what is left
            prob *= float(q[c]) / left
            left -= float(q[c])
        yield kids, prob, q


def tree_round(target: TableLM, draft: TableLM, params: SamplingParams, sampled: bool) -> Outputs:
    """Exact distribution of what verify_tree commits, over every tree of shape BRANCHING the drafter can grow."""
    memo: dict[tuple[int, ...], Outputs] = {}

    def below(prefix: tuple[int, ...]) -> Outputs:  # what is committed after an accepted node `prefix`
        if prefix in memo:
            return memo[prefix]
        p = target.probs(prefix, params)
        out: Outputs = defaultdict(float)
        if len(prefix) == len(BRANCHING):  # an accepted leaf: bonus ~ p
            out.update({(y,): py for y, py in enumerate(p.tolist())})
            return memo.setdefault(prefix, out)
        for kids, prob, q in sibling_sets(draft, params, prefix, BRANCHING[len(prefix)], sampled):
            branches = rrs_without_replacement(p, q, torch.tensor(kids, dtype=torch.int64))
            for c, a in zip(kids, branches.child_probs.tolist()):  # a: P(descend into c | these children)
                for committed, pc in below(prefix + (c,)).items():
                    out[(c,) + committed] += prob * a * pc
            rejected = prob * (1.0 - float(branches.child_probs.sum()))
            for y, py in enumerate(branches.residual.tolist()):  # all rejected: recovered token
                out[(y,)] += rejected * py
        return memo.setdefault(prefix, out)

    return below(())


@pytest.mark.parametrize("params", WARPS, ids=WARP_IDS)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled-siblings", "top-k-children"])
def test_tree_commits_exactly_the_target_distribution(params: SamplingParams, sampled: bool) -> None:
    target = TableLM.random(len(BRANCHING) + 1, seed=3)
    outputs = tree_round(target, target.perturbed(seed=4), params, sampled)
    assert sum(outputs.values()) == pytest.approx(1.0, abs=1e-6)
    assert deviation_from_target(outputs, target, params, horizon=len(BRANCHING) + 1) < 1e-6


BUGS: dict[str, tuple[str, Callable]] = {
    "accept-always": ("acceptance_prob", lambda p, q, x: torch.ones(x.shape)),
    "residual-is-p": ("residual", lambda p, q: p),
    "q-not-renormalised": ("remove_token", lambda q, x: q),  # siblings treated as drawn with replacement
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_exact_check_catches_a_wrong_rule(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, wrong = BUGS[bug]
    monkeypatch.setattr(verify, name, wrong)
    params = SamplingParams(temperature=1.0)
    target = TableLM.random(3, seed=3)
    draft = target.perturbed(seed=4)
    if bug == "q-not-renormalised":
        outputs = tree_round(target, draft, params, sampled=True)
    else:
        outputs = sampled_chain_outputs(target, draft, params, k=2)
    assert deviation_from_target(outputs, target, params, horizon=3) > 1e-3


# ------------------------------------------------------------------------------------------------ chi-square

BIG_VOCAB = 256
START = 0  # the last committed token before decoding starts
CHI_PARAMS = SamplingParams(temperature=0.9)


def bigram_models() -> tuple[Tensor, Tensor]:
    """Target and draft next-token distributions [V, V] (row = previous token), warped alike."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(BIG_VOCAB, BIG_VOCAB, generator=g)
    draft = 0.6 * target + torch.randn(BIG_VOCAB, BIG_VOCAB, generator=g)
    return warp(target, CHI_PARAMS), warp(draft, CHI_PARAMS)


def chain_rounds(p: Tensor, q: Tensor, k: int, g: torch.Generator) -> Callable[[Tensor], list[list[int]]]:
    """One round per row of `last` [m]: draft k tokens from q (vectorised), then verify_chain each row."""

    def run(last: Tensor) -> list[list[int]]:
        context = [last]
        for _ in range(k):
            context.append(sample(q[context[-1]], g))
        context_ = torch.stack(context, 1)  # [m, k+1]: last committed token, then the drafts
        return [verify_chain(p[row], row[1:], q[row[:-1]], g).tokens for row in context_]

    return run


def tree_rounds(p: Tensor, q: Tensor, g: torch.Generator) -> Callable[[Tensor], list[list[int]]]:
    """One round per row of `last` [m]: grow a 3 × 2 tree by sampling siblings without replacement, verify_tree."""
    parents = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 2, 2])

    def run(last: Tensor) -> list[list[int]]:
        kids = torch.multinomial(q[last], 3, replacement=False, generator=g)  # [m, 3]
        grandkids = torch.multinomial(q[kids.flatten()], 2, replacement=False, generator=g)  # [3m, 2]
        tokens = torch.cat([kids, grandkids.view(-1, 6)], 1)  # [m, 9] in node order
        parent_tokens = torch.cat([last.unsqueeze(1).expand(-1, 3), kids.repeat_interleave(2, 1)], 1)  # [m, 9]
        results = []
        for root, node_tokens, above in zip(last, tokens, parent_tokens):
            tree = DraftTree(tokens=node_tokens, parents=parents, probs=q[above])
            results.append(verify_tree(p[torch.cat([root.view(1), node_tokens])], tree, g).tokens)
        return results

    return run


def first_two_tokens(run_round: Callable[[Tensor], list[list[int]]], n: int) -> tuple[Tensor, Tensor]:
    """n independent decodes from START, each by rounds until two tokens are committed → (first [n], second [n])."""
    out = run_round(torch.full((n,), START))
    short = [i for i, tokens in enumerate(out) if len(tokens) < 2]  # the first round committed one token
    if short:
        for i, more in zip(short, run_round(torch.tensor([out[i][0] for i in short]))):
            out[i] = out[i] + more
    return torch.tensor([t[0] for t in out]), torch.tensor([t[1] for t in out])


def chi_square_pvalue(samples: Tensor, probs: Tensor) -> float:
    """Goodness of fit of token samples [n] to probs [V]; tokens expected < 5 times are pooled into one cell."""
    observed = torch.bincount(samples, minlength=BIG_VOCAB).double()
    expected = probs.double() / probs.double().sum() * samples.numel()
    rare = expected < 5
    if rare.any():
        observed = torch.cat([observed[~rare], observed[rare].sum().view(1)])
        expected = torch.cat([expected[~rare], expected[rare].sum().view(1)])
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def test_verify_chain_samples_match_the_target() -> None:
    p, q = bigram_models()
    first, second = first_two_tokens(chain_rounds(p, q, k=2, g=torch.Generator().manual_seed(1)), n=12000)
    assert chi_square_pvalue(first, p[START]) > 1e-3
    assert chi_square_pvalue(second, p[START].double() @ p.double()) > 1e-3


def test_verify_tree_samples_match_the_target() -> None:
    p, q = bigram_models()
    first, second = first_two_tokens(tree_rounds(p, q, g=torch.Generator().manual_seed(2)), n=3000)
    assert chi_square_pvalue(first, p[START]) > 1e-3
    assert chi_square_pvalue(second, p[START].double() @ p.double()) > 1e-3


@pytest.mark.parametrize("bug", ["accept-always", "residual-is-p"])
def test_chi_square_catches_a_wrong_verifier(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, wrong = BUGS[bug]
    monkeypatch.setattr(verify, name, wrong)
    p, q = bigram_models()
    rounds = chain_rounds(p, q, k=2, g=torch.Generator().manual_seed(1))(torch.full((3000,), START))
    first = torch.tensor([tokens[0] for tokens in rounds])
    assert chi_square_pvalue(first, p[START]) < 1e-6
