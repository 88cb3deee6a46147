"""PEARL (Liu et al., "PEARL: Parallel Speculative Decoding with Adaptive Draft Length", ICLR 2025): the drafter
drafts the next block while the target verifies this one.

Each sequence may carry a *window*: draft tokens proposed last round, past its committed tokens. A round

    1. asks the drafter for a block e_0..e_b after tokens + window, assuming the whole window will be accepted
       (e_0 is its guess at the token the target adds after the window). A drafter in an actor (on its own
       device) drafts it while
    2. the target scores [pending, window]: 1 + w rows;
    3. the window and e_0 are verified against those rows — e_0 by the last row, which in plain speculative
       decoding would give the bonus token — with the usual rule (greedy match, or rejection sampling with
       q(e_0) from the block), so there is no bonus token;
    4. all accepted: commit window + e_0, and e_1..e_b become the next window (post-verify: drafting never
       waited for the target); a rejection at n: commit the accepted drafts and the recovered token, and drop
       the block (drafted on a prefix that did not happen).

With an empty window (the first round, and after every rejection) step 2 is a one-row decode that checks e_0:
PEARL's pre-verify. The draft length per target call grows while the text is predictable and falls to one
token on a rejection, with no controller: PEARL's adaptive draft length. Lossless by the same argument as
every chain: each committed token passed the accept test against the target's row for its position (e_0's q is
the block's first row, and the block was drawn after tokens + window, exactly the context e_0 is then judged in).

A round costs max(draft block, verify) when the drafter runs elsewhere, against their sum for draft-then-verify;
in one process (no actor) the block is drafted before the target runs, same tokens, no overlap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from pydantic import Field

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.scheduler.drafters import NO_DRAFT, Draft, Drafter, TimedDrafter, start_proposals
from outrider.scheduler.engine import Engine, Sequence
from outrider.scheduler.policy import MAX_DRAFT, DraftPolicy
from outrider.scheduler.verify import point_mass


class Overlapped:
    """PEARL's round order (the `Rounds` of the engine). It keeps each sequence's window, keyed by seq_id."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock  # seconds; tests pass a virtual clock
        self.windows: dict[int, Draft] = {}  # seq_id -> drafts proposed past its committed tokens

    def window(self, seq: Sequence) -> Draft:
        """The drafts this sequence carries into its next round (empty after a rejection or a plain round)."""
        return self.windows.get(seq.seq_id, NO_DRAFT)

    def release(self, seq_id: int) -> None:
        self.windows.pop(seq_id, None)

    def run(self, engine: Engine, seqs: list[Sequence], speculate: bool) -> list[list[int]]:
        t0 = self.clock()
        # The block is k + 1 long: e_0 is checked this round, e_1..e_k form the next window (k drafts, as
        # many rows as a draft-then-verify round with the same k scores).
        sizes = engine.draft_lengths(seqs, speculate, extra=1)
        for s in seqs:
            if not engine.drafts(s, speculate):
                self.release(s.seq_id)  # a plain round: window tokens are only proposals, dropping them is lossless
        live = [i for i, size in enumerate(sizes) if size]
        requests = engine.draft_requests([seqs[i] for i in live], [sizes[i] for i in live],
                                         [self.window(seqs[i]).tokens for i in live])
        collect = start_proposals(engine.drafter, requests) if live else list
        t1 = self.clock()
        logits = engine.score(seqs, [self.window(s) for s in seqs])
        verify_time = self.clock() - t1
        blocks = dict(zip(live, collect()))  # waits for the drafter, if it is still drafting
        draft_time = self.clock() - t0 - verify_time  # the part of the draft the verify did not hide
        if live:  # the speed ratio for AutoK, which sets k from it: one batched draft step vs the verify
            step = _block_seconds(engine.drafter, t1 - t0) / max(sizes)
            for i in live:
                if isinstance(seqs[i].policy, AutoK):
                    seqs[i].policy.observe(step, verify_time)
        return [self._finish(engine, s, blocks.get(i, NO_DRAFT), rows, max(draft_time, 0.0), verify_time)
                for i, (s, rows) in enumerate(zip(seqs, logits))]

    def _finish(self, engine: Engine, seq: Sequence, block: Draft, logits: torch.Tensor, draft_time: float,
                verify_time: float) -> list[int]:
        window = self.windows.pop(seq.seq_id, NO_DRAFT)
        drafted = window.tokens + block.tokens[:1]
        probs = _rows(window, block)
        result = engine.verify(seq, drafted, probs, logits)
        new = engine.commit(seq, len(window.tokens), len(drafted), result, draft_time, verify_time)
        if block.tokens and result.num_accepted == len(drafted) and not seq.finished:
            self.windows[seq.seq_id] = Draft(block.tokens[1:], None if block.probs is None else block.probs[1:])
        return new


def _block_seconds(drafter: Drafter, sent: float) -> float:
    """How long drafting the block took: as measured where it ran when the drafter times itself (an actor: here
    only its unhidden part is visible), else the time `start_proposals` took (a drafter in this process drafts
    then)."""
    reported = drafter.last_propose_seconds if isinstance(drafter, TimedDrafter) else None
    return sent if reported is None else reported


def _rows(window: Draft, block: Draft) -> torch.Tensor | None:
    """q rows of window + e_0 (None: every draft was a deterministic proposal, q a point mass)."""
    if not block.tokens:
        return window.probs
    if window.probs is None and block.probs is None:
        return None
    vocab = (block.probs if block.probs is not None else window.probs).shape[-1]

    def q(draft: Draft, rows: int) -> torch.Tensor:
        if draft.probs is not None:
            return draft.probs[:rows]
        return point_mass(torch.tensor(draft.tokens[:rows], dtype=torch.long), vocab)

    return torch.cat([q(window, len(window.tokens)), q(block, 1)])


@dataclass
class AutoK:
    """PEARL's automatic window size, as its authors' follow-up engine nano-PEARL sets it: draft the next block in
    about the time the target takes to verify this one, γ ≈ c = T_verify / T_draft_step. More would keep the
    target waiting for the draft; fewer would leave the draft idle while the target verifies (and shorten the
    accepted runs).

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


class PearlOptions(StrategyOptions):
    name: Literal["pearl"] = "pearl"
    extra_policies: ClassVar[dict[str, tuple[str, str]]] = {
        "auto": ("sets k so drafting the next block takes as long as verifying this one", "overlaps")}
    policy: Literal["fixed", "adaptive", "auto"] = Field(
        "fixed", description="fixed, adaptive, or auto: k from the measured verify / draft-step time ratio, so "
                             "drafting the next block takes about as long as verifying this one (k is its bound)")


class Pearl(Method):
    name = "pearl"
    summary = ("PEARL: the draft model drafts the next block while the target verifies this one (pre-/post-verify; "
               "overlaps when the draft runs in its own actor)")
    Options = PearlOptions
    uses_draft_model = True

    def policy(self, options: StrategyOptions) -> Callable[[], DraftPolicy]:
        if options.policy == "auto":  # only overlapped rounds time the draft against the verify
            k = options.k
            return lambda: AutoK(k_max=k)
        return super().policy(options)

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        return EngineParts(env.chain_drafter(), self.policy(options), Overlapped())


METHOD = Pearl()
