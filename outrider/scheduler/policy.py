"""Draft-length policies: how many tokens to draft for a sequence in its next round."""
from __future__ import annotations

from dataclasses import dataclass
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
