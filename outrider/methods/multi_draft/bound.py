"""The best acceptance any lossless verifier can reach for a fixed way of drawing n drafts (Hu et al., ICLR 2025).

At one position the verifier must output Y ~ p exactly and wants Y among the drafts S ~ Q. That is a transport
problem, the coupling of p and Q maximising P(Y ∈ S); as a max-flow on the bipartite graph {y} -> {S ∋ y} its
value is the minimum cut
        α* = min over token sets T of  p(T) + 1 − Q(S ⊆ T),
taking T to be the tokens left uncut. The minimum is searched over the |V| + 1 prefixes of the tokens sorted by
p(x)/q(x) ascending (the tests check it against the primal LP solved by scipy and against every subset). Q(S ⊆ T)
depends on how the drafts are drawn:
- with replacement: q(T)^n;
- without replacement: every token x races with an exponential clock of rate q(x) and the drafts are the first n
  to arrive, so Q(S ⊆ T) = P(n tokens of T arrive before the first of V − T) = ∫ λ e^{−λt} P(N_T(t) ≥ n) dt with
  λ = q(V − T) and N_T(t) a Poisson-binomial count, computed by a DP over T on a geometric grid of t;
- greedy (n − 1 top tokens H plus one draw from q' = q off H): α* = p(H) + Σ_{x ∉ H} min(p(x), q'(x)), which the
  greedy-draft verifier reaches.
All in float64 numpy. Large vocabularies are cut to q's `support` most probable tokens (q renormalised on them, p
untouched): α* is 1-Lipschitz in the total variation of Q, so the cut moves it by at most `tail` = n·q(rest).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID_STEP = 0.1  # in log t: the trapezoid rule on an analytic, doubly decaying integrand converges geometrically


@dataclass(frozen=True)
class Bound:
    value: float  # α*: the optimal acceptance probability of one position
    tail: float  # how far the support cut can have moved it (0: exact)


@dataclass(frozen=True)
class Support:
    """One position cut to q's most probable tokens: p there, q there renormalised, and q's mass outside."""

    p: np.ndarray
    q: np.ndarray
    rest: float


def restrict(p: np.ndarray, q: np.ndarray, support: int) -> Support:
    """The position (p [V], q [V]) on q's `support` most probable tokens with q > 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    order = np.argsort(-q, kind="stable")
    kept = order[:support][q[order[:support]] > 0]
    return Support(p[kept], q[kept] / q[kept].sum(), float(q[order[support:]].sum()) / float(q.sum()))


def ratio_order(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Token indices by p/q ascending (q = 0 last)."""
    ratio = np.where(q > 0, p / np.where(q > 0, q, 1.0), np.inf)
    return np.argsort(ratio, kind="stable")


def all_in_without_replacement(q_sorted: np.ndarray, n: int) -> np.ndarray:
    """[len + 1] Q(S ⊆ T_k) for the prefixes T_k of q_sorted (a distribution), n drafts without replacement."""
    m = len(q_sorted)
    out = np.zeros(m + 1)
    n = min(n, m)
    if n == 0:
        return np.ones(m + 1)
    out[m] = 1.0  # T = the whole support: every draft is in it
    positive = q_sorted[q_sorted > 0]
    t_lo, t_hi = 1e-9 / positive.max(), 60.0 / positive.min()
    s = np.arange(np.log(t_lo), np.log(t_hi) + GRID_STEP, GRID_STEP)
    t = np.exp(s)
    counts = np.zeros((n, len(t)))  # counts[j](t) = P(exactly j tokens of T_k arrived by t), j < n
    counts[0] = 1.0
    outside = np.concatenate([np.cumsum(q_sorted[::-1])[::-1], [0.0]])  # outside[k] = q(V − T_k), summed directly
    for k, qx in enumerate(q_sorted[:-1], start=1):
        arrived = -np.expm1(-qx * t)  # P(x arrived by t)
        counts[1:] = counts[1:] * (1.0 - arrived) + counts[:-1] * arrived
        counts[0] *= 1.0 - arrived
        rate = outside[k]  # λ
        at_least_n = np.clip(1.0 - counts.sum(0), 0.0, 1.0)
        out[k] = GRID_STEP * float(np.sum(rate * t * np.exp(-rate * t) * at_least_n))
    return np.clip(out, 0.0, 1.0)


def optimal_acceptance(p: np.ndarray, q: np.ndarray, n: int, sampling: str, support: int = 512) -> Bound:
    """α* for target p [V] and draft q [V] (both warped), n drafts drawn by `sampling` (see the module)."""
    return optimal_on(restrict(p, q, support), n, sampling)


def optimal_on(cut: Support, n: int, sampling: str) -> Bound:
    """α* on a position already cut to its support (`restrict`), which several n and schemes can share."""
    p_s, q_s = cut.p, cut.q
    n = min(n, len(q_s))
    tail = n * cut.rest
    if sampling == "greedy":
        head = np.argsort(-q_s, kind="stable")[:n - 1]
        q_rest = q_s.copy()
        q_rest[head] = 0.0
        q_rest /= q_rest.sum()  # q' = 0 on the head, so min(p, q') adds nothing there
        return Bound(float(p_s[head].sum() + np.minimum(p_s, q_rest).sum()), tail)
    order = ratio_order(p_s, q_s)
    p_prefix = np.concatenate([[0.0], np.cumsum(p_s[order])])
    if sampling == "with-replacement":
        q_in = np.concatenate([[0.0], np.cumsum(q_s[order])]) ** n
    elif sampling == "without-replacement":
        q_in = all_in_without_replacement(q_s[order], n)
    else:
        raise ValueError(f"unknown sampling {sampling!r}")
    return Bound(float(np.min(p_prefix + 1.0 - q_in)), tail)
