"""Fakes of the engine's interfaces, so loop tests run in milliseconds and control acceptance exactly."""
from __future__ import annotations

from outrider.scheduler.drafters import Draft, DraftRequest
from outrider.scheduler.policy import node_depths


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


class TreeOracle:
    """Proposes a tree of one fixed shape (`parents`) whose `path` nodes carry the reference continuation and
    every other node a token that is wrong where it is compared: full, zero or mixed acceptance by the path."""

    def __init__(self, prompt_len: int, reference: list[int], parents: list[int], path: list[int], vocab: int = 256):
        self.prompt_len, self.reference, self.vocab = prompt_len, reference, vocab
        self.parents, self.path = parents, path
        self.depths = node_depths(parents)
        assert all(self.depths[n] == d for d, n in enumerate(path, start=1)), "path must run root to node"

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        pass

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            ahead = self.reference[len(r.tokens) - self.prompt_len:] + [0] * len(self.parents)
            tokens = []
            for i, depth in enumerate(self.depths):
                right = ahead[depth - 1]
                tokens.append(right if i in self.path else (right + 1 + i) % self.vocab)
            drafts.append(Draft(tokens, None, list(self.parents)))
        return drafts

    def release(self, seq_id: int) -> None:
        pass

    def slots_in_use(self) -> int:
        return 0
