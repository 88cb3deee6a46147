"""PEARL's rounds (Liu et al., ICLR 2025): the drafter drafts the next block while the target verifies this one.

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
from typing import TYPE_CHECKING, Callable

import torch

from outrider.scheduler.drafters import NO_DRAFT, Draft, start_proposals
from outrider.scheduler.verify import point_mass

if TYPE_CHECKING:
    from outrider.scheduler.engine import Engine, Sequence


class Overlapped:
    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock  # seconds; tests pass a virtual clock

    def run(self, engine: "Engine", seqs: list["Sequence"], speculate: bool) -> list[list[int]]:
        t0 = self.clock()
        # The block is k + 1 long: e_0 is checked this round, e_1..e_k form the next window (k drafts, as
        # many rows as a draft-then-verify round with the same k scores).
        sizes = engine.draft_lengths(seqs, speculate, extra=1)
        for s in seqs:
            if not engine.drafts(s, speculate):
                s.window = NO_DRAFT  # a plain round: window tokens are only proposals, dropping them is lossless
        live = [i for i, size in enumerate(sizes) if size]
        collect = (start_proposals(engine.drafter, engine.draft_requests([seqs[i] for i in live],
                                                                         [sizes[i] for i in live]))
                   if live else list)
        t1 = self.clock()
        logits = engine.score(seqs, [s.window for s in seqs])
        verify_time = self.clock() - t1
        blocks = dict(zip(live, collect()))  # waits for the drafter, if it is still drafting
        draft_time = self.clock() - t0 - verify_time  # the part of the draft the verify did not hide
        if live:  # the speed ratio for policies that set k from it (AutoK): one batched draft step vs the verify
            step = _block_seconds(engine.drafter, t1 - t0) / max(sizes)
            for i in live:
                seqs[i].policy.observe(step, verify_time)
        return [self._finish(engine, s, blocks.get(i, NO_DRAFT), rows, max(draft_time, 0.0), verify_time)
                for i, (s, rows) in enumerate(zip(seqs, logits))]

    @staticmethod
    def _finish(engine: "Engine", seq: "Sequence", block: Draft, logits: torch.Tensor, draft_time: float,
                verify_time: float) -> list[int]:
        window, seq.window = seq.window, NO_DRAFT
        drafted = window.tokens + block.tokens[:1]
        probs = _rows(window, block)
        result = engine.verify(seq, drafted, probs, logits)
        new = engine.commit(seq, len(window.tokens), len(drafted), result, draft_time, verify_time)
        if block.tokens and result.num_accepted == len(drafted) and not seq.finished:
            seq.window = Draft(block.tokens[1:], None if block.probs is None else block.probs[1:])
        return new


def _block_seconds(drafter, sent: float) -> float:
    """How long drafting the block took: as measured in the actor when the drafter runs in one (here only its
    unhidden part is visible), else the time `start_proposals` took (a drafter in this process drafts then)."""
    reported = getattr(drafter, "last_propose_seconds", None)
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
