"""Fakes of the engine's interfaces, so loop tests run in milliseconds and control acceptance exactly."""
from __future__ import annotations

from outrider.scheduler.drafters import Draft, DraftRequest


class OracleDrafter:
    """Proposes the reference continuation, corrupting every `wrong_every`-th proposal: mixed acceptance."""

    def __init__(self, prompt_len: int, reference: list[int], wrong_every: int = 3, vocab: int = 256):
        self.prompt_len, self.reference = prompt_len, reference
        self.wrong_every, self.vocab = wrong_every, vocab
        self.calls = 0

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        pass

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            done = len(r.tokens) - self.prompt_len
            tokens = list(self.reference[done:done + r.k])
            self.calls += 1
            if tokens and self.calls % self.wrong_every == 0:
                j = self.calls % len(tokens)
                tokens[j] = (tokens[j] + 1) % self.vocab
            drafts.append(Draft(tokens, None))
        return drafts

    def release(self, seq_id: int) -> None:
        pass

    def slots_in_use(self) -> int:
        return 0
