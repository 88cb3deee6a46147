"""Draft-length policies: how many tokens to draft for a sequence in its next round."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

MAX_DRAFT = 8  # longest chain (deepest tree): k + 1 = 9 rows (two query tiles); k <= 7 fits one ROW_BLOCK
MAX_TREE_NODES = 16  # most nodes of a draft tree
MAX_VERIFY_ROWS = MAX_TREE_NODES + 1  # widest verify: a tree's nodes and the pending token


class DraftPolicy(Protocol):
    def next_k(self) -> int: ...

    def update(self, proposed: int, accepted: int, draft_cost: float | None) -> None:
        """Feedback after a round. draft_cost: measured draft time per token / target time per round."""
        ...


@dataclass
class FixedK:
    k: int

    def __post_init__(self) -> None:
        if not 0 <= self.k <= MAX_DRAFT:
            raise ValueError(f"draft length k={self.k} must be in 0..{MAX_DRAFT}")

    def next_k(self) -> int:
        return self.k

    def update(self, proposed: int, accepted: int, draft_cost: float | None) -> None:
        pass


@dataclass
class AdaptiveK:
    """Pick k to maximise expected tokens per unit of time from the measured acceptance rate and draft cost.

    With per-token acceptance α, a round drafting k tokens commits E(k) = (1 − α^{k+1}) / (1 − α) tokens and
    costs k·c + 1 target-forward units (c = draft cost per token relative to one verify), so we take
    argmax_k E(k) / (k·c + 1). α and c are exponential moving averages, so the choice follows the text.
    """

    k_max: int = MAX_DRAFT
    k_min: int = 1
    alpha: float = 0.7  # prior acceptance rate
    cost: float = 0.2  # prior draft cost ratio
    smoothing: float = 0.3  # weight of the newest round

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k_max <= MAX_DRAFT:
            raise ValueError(f"need 1 <= k_min <= k_max <= {MAX_DRAFT}, got {self.k_min}, {self.k_max}")

    def next_k(self) -> int:
        a = min(self.alpha, 0.999)
        def rate(k: int) -> float:
            return (1 - a ** (k + 1)) / (1 - a) / (k * self.cost + 1)
        return max(range(self.k_min, self.k_max + 1), key=rate)

    def update(self, proposed: int, accepted: int, draft_cost: float | None) -> None:
        if proposed == 0:
            return
        # A round that stopped at the first rejection saw accepted successes and one failure: per-token
        # acceptance ≈ accepted / (accepted + 1) when rejected, 1 when all were accepted.
        observed = 1.0 if accepted == proposed else accepted / (accepted + 1)
        self.alpha += self.smoothing * (observed - self.alpha)
        if draft_cost is not None:
            self.cost += self.smoothing * (draft_cost - self.cost)


@dataclass
class VerifyCost:
    """Seconds of one target forward by its rows, learned from the engine's verify timer (a moving average per
    row count). Extra rows are nearly free until a kernel's row block or the compute bound is reached, then cost
    climbs in steps that differ by CPU, GPU and weight format; a tree is sized against what was measured here."""

    smoothing: float = 0.2
    seconds: dict[int, float] = field(default_factory=dict)

    def observe(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else old + self.smoothing * (seconds - old)

    def table(self, offset: int = 0) -> tuple[float, ...] | None:
        """Estimated seconds of a forward carrying `offset` other rows plus 1..MAX_VERIFY_ROWS of this sequence;
        None before any measurement. A row count not measured yet costs what the nearest measured count below it
        did (optimistic, so a larger tree is tried once and its cost learned)."""
        if not self.seconds:
            return None
        out, last = [], min(self.seconds.values())
        for rows in range(offset + 1, offset + MAX_VERIFY_ROWS + 1):
            last = self.seconds.get(rows, last)
            out.append(last)
        return tuple(out)


@dataclass
class TreeBudget:
    """How many nodes of a ranked draft tree to verify: the count that maximises expected tokens per second of the
    round, with each node's acceptance estimate calibrated per depth by what was accepted before.

    A drafter ranks its nodes (parents before children) with a score each, its own estimate that the node is
    accepted (a draft model's path probability, a suffix continuation's frequency). Verifying n nodes is expected
    to commit 1 + sum of the n calibrated estimates; the round costs the draft time plus the verify time of n + 1
    rows. Calibration: per depth, the realised count of rounds whose accepted path reached that depth over the sum
    of the estimates of the nodes verified there (the events are disjoint: one path is accepted)."""

    predicted: list[float] = field(default_factory=lambda: [1.0] * (MAX_DRAFT + 1))  # per depth, a prior of 1
    realised: list[float] = field(default_factory=lambda: [1.0] * (MAX_DRAFT + 1))
    last: dict[int, tuple[int, list[int], list[int], list[float]]] = field(default_factory=dict)

    def settle(self, seq_id: int, tokens: list[int]) -> None:
        """Learn from the sequence's previous proposal, now that `tokens` says how much of it was committed."""
        proposal = self.last.pop(seq_id, None)
        if proposal is None:
            return
        base, nodes, parents, scores = proposal
        depths = node_depths(parents)
        reached = len(follow_path(nodes, parents, tokens[base:]))
        for i, score in enumerate(scores):
            self.predicted[depths[i]] += score
        for d in range(1, reached + 1):
            self.realised[d] += 1

    def size(self, scores: list[float], depths: list[int], verify_seconds: tuple[float, ...] | None,
             draft_seconds: float) -> int:
        """How many of the ranked nodes to verify (all of them before any verify cost is measured)."""
        if verify_seconds is None or not scores:
            return len(scores)
        expected, best, best_rate = 1.0, 0, 1.0 / max(draft_seconds + verify_seconds[0], 1e-9)
        for n, (score, depth) in enumerate(zip(scores, depths), start=1):
            expected += min(1.0, score * self.realised[depth] / self.predicted[depth])
            rate = expected / max(draft_seconds + verify_seconds[n], 1e-9)
            if rate > best_rate:
                best, best_rate = n, rate
        return best

    def record(self, seq_id: int, base: int, nodes: list[int], parents: list[int], scores: list[float]) -> None:
        """The proposal made for the sequence whose committed tokens were `base` long."""
        self.last[seq_id] = (base, nodes, parents, scores)

    def forget(self, seq_id: int) -> None:
        self.last.pop(seq_id, None)


def follow_path(nodes: list[int], parents: list[int], committed: list[int],
                among: list[int] | None = None) -> list[int]:
    """The tree nodes (of `among`, default all) that the `committed` tokens after the tree's root walk down, from
    the root: where a proposal's accepted path ended."""
    path, node = [], -1
    candidates = range(len(nodes)) if among is None else among
    for token in committed:
        node = next((i for i in candidates if parents[i] == node and nodes[i] == token), -1)
        if node < 0:
            break
        path.append(node)
    return path


def node_depths(parents: list[int]) -> list[int]:
    """Each node's depth (1: a child of the pending token), parents listed before their children."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths
