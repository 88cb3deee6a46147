"""Lossless verification of draft tokens: rejection sampling over chains and trees, as pure tensor functions.

Glossary (Outrider uses these words in this sense everywhere):
- *draft tokens* x_1..x_k: what the drafter proposes after the last committed token.
- *accepted* token: a draft token that passed the accept test. The accepted tokens are always a prefix of the
  draft (in a tree, a root-to-node path): verification stops at the first rejection.
- *recovered* token: at the first rejection, the token drawn in place of the rejected draft from the residual
  p' = norm(max(0, p − q)). It ends the round.
- *bonus* token: when every draft token is accepted, the token drawn from the target's next distribution
  p_{k+1} (at a tree leaf: that leaf's p). The target forward that scored the drafts produced it for free.
- *extra* token: the recovered or the bonus token. Every round commits exactly one.
- *acceptance length* = accepted tokens + 1 (it counts the extra token): tokens committed per target forward,
  between 1 and k + 1.

Notation (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling"): p_i is the target's *warped* distribution at
draft position i, and q_i is the distribution x_i was *actually drawn from*. A deterministic proposal (greedy
draft, n-gram, top-k tree children) has q_i = δ_{x_i}, the point mass: the accept test is then p(x_i) against a
uniform draw, and the residual is p with x_i removed. Greedy decoding needs no
special case: with one-hot p every accept probability is 0 or 1 and every residual is one-hot, so no outcome
depends on the random draws (they are still drawn).

Why it is lossless, at one position:
    P(out = y) = q(y)·min(1, p(y)/q(y)) + (1 − Σ_z min(p(z), q(z)))·p'(y)
               = min(p, q)(y) + (p − q)_+(y) = p(y),
and by induction over positions the committed tokens are distributed exactly as the warped target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from outrider.scheduler.sampling import TokenLogprob, argmax, sample

# ----------------------------------------------------------------------------------------------------------------
# The accept rule, piece by piece. verify_chain, verify_tree and the exact-distribution tests all use these.
# ----------------------------------------------------------------------------------------------------------------


def point_mass(tokens: Tensor, vocab: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[...] int64 → [..., V] one-hot rows δ_x: the q of a deterministic proposal."""
    return F.one_hot(tokens, vocab).to(dtype)


def acceptance_prob(p: Tensor, q: Tensor, x: Tensor) -> Tensor:
    """min(1, p(x)/q(x)) for p, q [..., V] and tokens x [...] → [...].

    A token drawn from q has q(x) > 0; were q(x) = 0, the ratio is +inf (accept) if p(x) > 0, else 0.
    """
    px = p.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # [...]
    qx = q.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # [...]
    # p(x) >= q(x): the target likes x at least as much as the draft did → always accept
    # p(x) <  q(x): the draft over-proposed x → accept with probability p(x)/q(x)
    ratio = torch.where(qx > 0, px / qx, (px > 0).to(p.dtype))
    return ratio.clamp(max=1.0)


def residual(p: Tensor, q: Tensor) -> Tensor:
    """p' = norm(max(0, p − q)), row-wise [..., V] → [..., V]: the recovered token's distribution.

    It puts back exactly the mass that rejection removed from p. With q = δ_x it is p with p(x) zeroed,
    renormalised. p == q gives 0/0: a rejection then has probability 0, but rounding can still land there,
    so such rows fall back to p.
    """
    return _normalize((p - q).clamp(min=0.0), fallback=p)


def remove_token(q: Tensor, x: Tensor) -> Tensor:
    """q [..., V] with token x [...] removed, renormalised: what the next sibling drawn without replacement
    was drawn from. (When nothing is left there is no next sibling, and the zero row is returned.)"""
    removed = q.scatter(-1, x.unsqueeze(-1), 0.0)
    return _normalize(removed, fallback=removed)


def _normalize(v: Tensor, fallback: Tensor) -> Tensor:
    """v / v.sum(-1) row-wise; rows with no mass become `fallback` instead of 0/0."""
    mass = v.sum(-1, keepdim=True)  # [..., 1]
    return torch.where(mass > 0, v / mass.clamp(min=torch.finfo(v.dtype).tiny), fallback)


# ----------------------------------------------------------------------------------------------------------------
# Chains
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """One round over a chain of k draft tokens."""

    num_accepted: int  # accepted draft tokens (a prefix of the draft), 0..k
    tokens: list[int]  # the accepted drafts + the extra token (recovered, or bonus if all k were accepted)
    # each token's log-probability under the target, when the request asks for them (`Engine.verify` adds them)
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def acceptance_length(self) -> int:
        """num_accepted + 1: the extra token counts."""
        return self.num_accepted + 1


    @property
    def path(self) -> list[int]:
        """The accepted drafts' indices (a chain's accepted prefix; `TreeVerifyResult.path` for a tree)."""
        return list(range(self.num_accepted))


@dataclass(frozen=True)
class ChainBranches:
    """Every probability verify_chain draws from; the exact-distribution tests enumerate these."""

    accept_probs: Tensor  # [k] P(accept x_i | x_<i accepted) = min(1, p_i(x_i)/q_i(x_i))
    extra_probs: Tensor  # [k+1, V] row j: the extra token's distribution when exactly j drafts are accepted:
    #                      j < k the residual norm(max(0, p_{j+1} − q_{j+1})), j = k the bonus row p_{k+1}


def chain_branches(target_probs: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None) -> ChainBranches:
    """The accept rule for a chain, all positions at once. Arguments as in verify_chain."""
    k, vocab = draft_tokens.shape[0], target_probs.shape[-1]
    assert target_probs.shape == (k + 1, vocab), f"target_probs {tuple(target_probs.shape)} != ({k + 1}, V)"
    p = target_probs[:k]  # [k, V] p_1..p_k score the drafts; p_{k+1} is the bonus row
    q = draft_probs if draft_probs is not None else point_mass(draft_tokens, vocab, p.dtype)  # [k, V]
    assert q.shape == p.shape, f"draft_probs {tuple(q.shape)} != {tuple(p.shape)}"
    return ChainBranches(
        accept_probs=acceptance_prob(p, q, draft_tokens),
        extra_probs=torch.cat([residual(p, q), target_probs[k:]]),
    )


def verify_chain(
    target_probs: Tensor,  # [k+1, V] warped target distributions p_1..p_{k+1}; row i scores draft i
    draft_tokens: Tensor,  # [k] int64
    draft_probs: Tensor | None,  # [k, V] the q rows the drafts were drawn from; None → point masses (§1.3)
    generator: torch.Generator | None,
) -> VerifyResult:
    """Speculative sampling over a chain (Leviathan et al. Algorithm 1):

        for i in 1..k:
            r ~ U[0, 1)
            if r < min(1, p_i(x_i)/q_i(x_i)): accept x_i and go on
            else: emit recovered y ~ norm(max(0, p_i − q_i)); stop
        all accepted: emit bonus y ~ p_{k+1}
    """
    k = draft_tokens.shape[0]
    branches = chain_branches(target_probs, draft_tokens, draft_probs)
    r = torch.rand(k, generator=generator, device=target_probs.device)  # [k] r_i ~ U[0, 1)
    accepted = r < branches.accept_probs  # [k] accept x_i iff r_i < min(1, p_i(x_i)/q_i(x_i))
    # Draw the extra token for every possible stopping point at once and keep row num_accepted. Still exact:
    # these draws are independent of r, and r alone decides where the chain stops.
    extra = sample(branches.extra_probs, generator)  # [k+1]
    return _chain_result(accepted, draft_tokens, extra)


def verify_greedy(target_logits: Tensor, draft_tokens: Tensor) -> VerifyResult:
    """Greedy fast path (no warp): accept while draft == argmax target; the extra token is the target's argmax
    at the first mismatch (recovered) or after the last draft (bonus).

    target_logits [k+1, V], draft_tokens [k]. Equal to verify_chain(warp(target_logits, greedy), draft_tokens,
    None, any generator): with one-hot p, accept iff p(x) = 1, and the residual of δ_argmax minus δ_x is δ_argmax.
    """
    k = draft_tokens.shape[0]
    assert target_logits.shape[0] == k + 1, f"target_logits {tuple(target_logits.shape)} != ({k + 1}, V)"
    target_argmax = argmax(target_logits)  # [k+1] ties → lowest index, as warp's greedy one-hot
    return _chain_result(draft_tokens == target_argmax[:k], draft_tokens, extra=target_argmax)


def _chain_result(accepted: Tensor, draft_tokens: Tensor, extra: Tensor) -> VerifyResult:
    """accepted [k] bool, draft_tokens [k], extra [k+1] (candidate extra token per stopping point) → result."""
    k = draft_tokens.shape[0]
    num_accepted = accepted.long().cumprod(0).sum()  # [] length of the all-accepted prefix
    # The one host sync of a chain verification: a single .tolist() of 2k + 2 ints.
    host = torch.cat([num_accepted.view(1), draft_tokens, extra]).tolist()
    n, drafts, extras = host[0], host[1 : k + 1], host[k + 1 :]
    return VerifyResult(num_accepted=n, tokens=drafts[:n] + [extras[n]])


# ----------------------------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens arranged as a tree under the root (the last committed token, which is not a node).

    Worked example, n = 6 nodes in topological order (every parent index is smaller than its child's):

        root ─┬─ 0 ─┬─ 2 ── 4        parents = [-1, -1, 0, 0, 2, 1]
              │     └─ 3             depths  = [ 1,  1, 2, 2, 3, 2]
              └─ 1 ── 5

        attention_mask(): row i attends to column j iff j is i or an ancestor of i
        (every node also attends to the whole committed prefix; that part is not in this mask)
                 j: 0 1 2 3 4 5
            i = 0 [ 1 . . . . . ]
            i = 1 [ . 1 . . . . ]
            i = 2 [ 1 . 1 . . . ]
            i = 3 [ 1 . . 1 . . ]
            i = 4 [ 1 . 1 . 1 . ]
            i = 5 [ . 1 . . . 1 ]

    The target scores all n nodes in one forward; node i sits at position prefix_len + depth(i) − 1 in the
    sequence that starts with the root at prefix_len − 1.
    """

    tokens: Tensor  # [n] int64 node tokens
    parents: Tensor  # [n] int64 parent node index (< own index); -1 for children of the root
    probs: Tensor | None = None  # [n, V] the q each node's token was drawn from. Siblings are drawn without
    #                              replacement from their parent's q, and each stores that same q row.
    #                              None → deterministic candidates (top-k, n-gram): point masses

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        assert self.tokens.shape == (n,) and self.parents.shape == (n,), "tokens and parents must be [n]"
        assert self.probs is None or self.probs.shape[0] == n, "probs must be [n, V]"
        own = torch.arange(n, device=self.parents.device)
        if not bool(((self.parents >= -1) & (self.parents < own)).all()):
            raise ValueError(f"DraftTree nodes must be in topological order (-1 <= parents[i] < i), "
                             f"got parents={self.parents.tolist()}")

    def children(self) -> list[list[int]]:
        """children()[u + 1] = the child node indices of node u, in order; entry 0 lists the root's children."""
        kids: list[list[int]] = [[] for _ in range(self.tokens.shape[0] + 1)]
        for i, parent in enumerate(self.parents.tolist()):
            kids[parent + 1].append(i)
        return kids

    def depths(self) -> Tensor:
        """[n] int64, 1 for the root's children."""
        depth: list[int] = []
        for parent in self.parents.tolist():  # parents come before their children
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return torch.tensor(depth, dtype=torch.int64, device=self.tokens.device)

    def attention_mask(self) -> Tensor:
        """[n, n] bool: node i attends to node j iff j is i or an ancestor of i (see the class docstring)."""
        n = self.tokens.shape[0]
        mask = torch.eye(n, dtype=torch.bool, device=self.tokens.device)
        for i, parent in enumerate(self.parents.tolist()):  # parent's row is final before its children's
            if parent >= 0:
                mask[i] |= mask[parent]
        return mask


@dataclass(frozen=True)
class TreeVerifyResult:
    path: list[int]  # accepted node indices, root → deepest, each a child of the one before
    tokens: list[int]  # tokens of the path + the extra (recovered or bonus) token
    logprobs: tuple[TokenLogprob, ...] = ()  # as VerifyResult's

    @property
    def num_accepted(self) -> int:
        return len(self.path)

    @property
    def acceptance_length(self) -> int:
        """num_accepted + 1: the extra token counts."""
        return len(self.path) + 1


@dataclass(frozen=True)
class LevelBranches:
    """Every probability the rule at one tree node draws from (exact-distribution tests enumerate these)."""

    child_probs: Tensor  # [m] P(the walk descends into child j), summing to at most 1
    residual: Tensor  # [V] the recovered token's distribution when it descends into none


# A sibling rule: (p [V] the target at the node, q [V] the draft row the children came from or None for
# deterministic children, children tokens [m]) -> LevelBranches. It is lossless for one way of drawing the children:
# P(out = y) = sum_j child_probs[j]·[c_j = y] + (1 - sum_j child_probs[j])·residual(y) = p(y).
SiblingRule = Callable[[Tensor, "Tensor | None", Tensor], LevelBranches]


def _sequential(accept_probs: list[Tensor], p: Tensor) -> LevelBranches:
    """Children tried in order, child j accepted w.p. accept_probs[j] once all before it were rejected."""
    if not accept_probs:
        return LevelBranches(child_probs=p.new_zeros(0), residual=p)
    a = torch.stack(accept_probs)  # [m]
    reach = torch.cat([a.new_ones(1), torch.cumprod(1.0 - a, 0)[:-1]])  # [m] P(children < j all rejected)
    return LevelBranches(child_probs=reach * a, residual=p)


def rrs_without_replacement(p: Tensor, q: Tensor | None, tokens: Tensor) -> LevelBranches:
    """Recursive rejection sampling for children drawn from q *without replacement* (Jeon et al. 2024; SpecInfer's
    multi-step speculative sampling, Miao et al. 2024, for the deterministic case):
        accept c_j w.p. min(1, p_j(c_j)/q_j(c_j))
        else p_{j+1} = norm(max(0, p_j − q_j)) and q_{j+1} = q_j with c_j removed, renormalised
    Deterministic children (q None): the same rule with q_j = δ_{c_j}, i.e.
        accept c_j w.p. p_j(c_j), else p_j(c_j) ← 0 and renormalise.
    A repeated deterministic child is harmless: its p(c) is already 0, so it is rejected and leaves p alone.
    """
    vocab = p.shape[-1]
    accept_probs = []
    for x in tokens:  # 0-d int64 tensors
        q_j = q if q is not None else point_mass(x, vocab, p.dtype)
        accept_probs.append(acceptance_prob(p, q_j, x))
        p = residual(p, q_j)  # p_{j+1}
        if q is not None:
            q = remove_token(q, x)  # q_{j+1}: c_{j+1} was drawn with c_1..c_j already taken
    return _sequential(accept_probs, p)


def rrs_with_replacement(p: Tensor, q: Tensor | None, tokens: Tensor) -> LevelBranches:
    """Recursive rejection sampling for children drawn i.i.d. from q *with replacement* (SpecInfer, Miao et al.
    2024; SpecTr's baseline):
        accept c_j w.p. min(1, p_j(c_j)/q(c_j)), else p_{j+1} = norm(max(0, p_j − q))
    q stays the same for every child: each was drawn afresh. Siblings may repeat: a rejected token's residual mass
    is 0, so its repeat is rejected too. Fed children drawn without replacement it is not lossless (q_j ≠ q)."""
    if q is None:
        return rrs_without_replacement(p, None, tokens)
    accept_probs = []
    for x in tokens:
        accept_probs.append(acceptance_prob(p, q, x))
        p = residual(p, q)
    return _sequential(accept_probs, p)


def greedy_draft_rule(p: Tensor, q: Tensor | None, tokens: Tensor) -> LevelBranches:
    """The verifier of greedy drafts, several per position ("Towards Optimal Multi-Draft Speculative Decoding",
    Hu et al. 2025):
    children c_1..c_{m−1} are the draft's top m − 1 tokens T (deterministic) and c_m = x was drawn from
    q' = q restricted to V − T, renormalised.
        accept x w.p. a = min(1, p(x)/q'(x)); else draw y ~ r = norm(max(0, p − q')),
        descend into c_j if y = c_j ∈ T, else y is the recovered token.
    Lossless: P(out = y) = min(p, q')(y) + (1 − Σ min(p, q'))·r(y) = p(y). Since q' = 0 on T, r(y) ∝ p(y) there,
    and the acceptance rate p(T) + Σ_{x ∉ T} min(p(x), q'(x)) equals the optimal transport bound for this way of
    drafting (the bound is min over sets S of p(S) + 1 − P(all drafts ∈ S); S = T ∪ {x: p(x) < q'(x)} attains it).
    """
    if q is None:
        return rrs_without_replacement(p, None, tokens)
    top, x = tokens[:-1], tokens[-1]
    q_rest = _normalize(q.scatter(-1, top, 0.0), fallback=q)  # q'
    a = acceptance_prob(p, q_rest, x)
    r = residual(p, q_rest)
    child_probs = torch.cat([(1.0 - a) * r[top], a[None]])
    recovered = r.scatter(-1, torch.cat([top, x[None]]), 0.0)  # y ∈ T descends instead; r(x) > 0 only if a = 1
    return LevelBranches(child_probs=child_probs, residual=_normalize(recovered, fallback=r))


def verify_tree(
    target_probs: Tensor,  # [n+1, V] row 0 = p at the root, row i+1 = p after node i
    tree: DraftTree,
    generator: torch.Generator | None,
    rule: SiblingRule = rrs_without_replacement,
) -> TreeVerifyResult:
    """Walk down from the root. At each node, the sibling `rule` for how its children were drawn says where to
    descend; if into none, emit a recovered token from its residual; at an accepted leaf, emit a bonus token from
    the leaf's p. Deterministic children (tree.probs None) always use the point-mass rule.

    Greedy trees fall out of one-hot p: the accepted child is the one equal to argmax p, so the path is the
    longest one that matches the target's argmax, and the extra token is the argmax after it.
    """
    assert target_probs.shape[0] == tree.tokens.shape[0] + 1, "target_probs must be [n+1, V]"
    children = tree.children()
    tokens = tree.tokens.tolist()  # host sync, once per tree
    path: list[int] = []
    node = -1  # the root
    while True:
        p, kids = target_probs[node + 1], children[node + 1]
        if not kids:  # an accepted leaf (or an empty tree): bonus ~ p
            return _tree_result(path, tokens, sample(p, generator))
        q = None if tree.probs is None else tree.probs[kids[0]]  # siblings all carry their parent's q
        branches = (rule if q is not None else rrs_without_replacement)(p, q, tree.tokens[kids])
        # One uniform picks the child (or none) by the cumulative descend probabilities. Host sync per node.
        u = torch.rand((), generator=generator, device=p.device)
        child = int((torch.cumsum(branches.child_probs, 0) <= u).sum())
        if child >= len(kids):
            return _tree_result(path, tokens, sample(branches.residual, generator))  # recovered
        node = kids[child]
        path.append(node)


def verify_tree_greedy(target_logits: Tensor, tree: DraftTree) -> TreeVerifyResult:
    """Greedy fast path (no warp): from the root, descend into the first child equal to the target's argmax at
    that node; the extra token is the argmax where no child matches. target_logits [n+1, V] as in verify_tree.

    Equal to verify_tree(warp(target_logits, greedy), tree, any generator): with one-hot p a deterministic child
    is accepted iff it is the argmax, and rejecting the others leaves the residual one-hot at the argmax."""
    assert target_logits.shape[0] == tree.tokens.shape[0] + 1, "target_logits must be [n+1, V]"
    best = argmax(target_logits).tolist()  # [n+1] the one host sync; ties → lowest index, as warp's one-hot
    children, tokens = tree.children(), tree.tokens.tolist()
    path: list[int] = []
    node = -1
    while True:
        match = [c for c in children[node + 1] if tokens[c] == best[node + 1]]
        if not match:
            return TreeVerifyResult(path=path, tokens=[tokens[i] for i in path] + [best[node + 1]])
        node = match[0]
        path.append(node)


def _tree_result(path: list[int], tokens: list[int], extra: Tensor) -> TreeVerifyResult:
    """extra: [] int64, the recovered or bonus token. `.item()` is a host sync, once per tree."""
    return TreeVerifyResult(path=path, tokens=[tokens[i] for i in path] + [int(extra.item())])
