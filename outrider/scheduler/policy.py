"""Draft-length policies: how many tokens to draft for a sequence in its next round."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MAX_DRAFT = 8  # widest verify: k + 1 = 9 rows (two query tiles); k <= 7 fits one ROW_BLOCK


class DraftPolicy(Protocol):
    def next_k(self) -> int: ...

    def update(self, proposed: int, accepted: int, draft_cost: float | None) -> None:
        """Feedback after a round. draft_cost: measured draft time per token / target time per round."""
        ...

    def observe(self, draft_token_seconds: float, verify_seconds: float) -> None:
        """Timers of an overlapped round (`outrider.scheduler.pearl.Overlapped`): seconds of one (batched) draft
        step, measured where the draft runs, and of the verify. Only speed-driven policies use them."""
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

    def observe(self, draft_token_seconds: float, verify_seconds: float) -> None:
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

    def observe(self, draft_token_seconds: float, verify_seconds: float) -> None:
        pass  # the draft cost comes through `update`, relative to the verify


@dataclass
class AutoK:
    """PEARL's automatic draft length (ALGORITHMS 2.2): draft the next block in about the time the target takes
    to verify this one, γ ≈ c = T_verify / T_draft_step. More would keep the target waiting for the draft; fewer
    would leave the draft idle while the target verifies (and shorten the accepted runs).

    An overlapped round drafts k + `ahead` tokens while the target verifies (PEARL's block: e_0, checked this
    round, and the next window e_1..e_k), so k = clamp(round(c) − ahead, 1, k_max). T_verify and T_draft_step
    are exponential moving averages of the rounds' timers (`observe`); until both are measured, k = k_start.
    Worked example: verify 40 ms, a draft step 10 ms → c = 4 → k = 3: blocks of 4 tokens, 40 ms of drafting.
    Any k is lossless (the target verifies every draft); this only moves speed."""

    k_max: int = MAX_DRAFT
    k_start: int = 3
    ahead: int = 1
    smoothing: float = 0.3  # weight of the newest round
    verify_seconds: float | None = None
    draft_token_seconds: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.k_max <= MAX_DRAFT:
            raise ValueError(f"k_max must be in 1..{MAX_DRAFT}, got {self.k_max}")

    def next_k(self) -> int:
        if self.verify_seconds is None or not self.draft_token_seconds:
            return min(self.k_start, self.k_max)
        c = self.verify_seconds / self.draft_token_seconds
        return max(1, min(self.k_max, round(c) - self.ahead))

    def update(self, proposed: int, accepted: int, draft_cost: float | None) -> None:
        pass  # k follows the speed ratio, not acceptance (PEARL adapts to acceptance through its windows)

    def observe(self, draft_token_seconds: float, verify_seconds: float) -> None:
        if draft_token_seconds > 0:
            self.draft_token_seconds = _ema(self.draft_token_seconds, draft_token_seconds, self.smoothing)
        if verify_seconds > 0:
            self.verify_seconds = _ema(self.verify_seconds, verify_seconds, self.smoothing)


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)
