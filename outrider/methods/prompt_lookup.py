"""Prompt lookup decoding (Saxena, 2023): n-gram drafts from the sequence's own context, no draft model. Find the
latest earlier occurrence of the last n tokens and propose what followed it. Deterministic, so q is a point mass."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.scheduler.drafters import Draft, DraftRequest


class PromptLookupOptions(StrategyOptions):
    name: Literal["prompt-lookup"] = "prompt-lookup"
    max_ngram: int = Field(3, ge=1, le=64, description="longest n-gram looked up (tried first)")
    min_ngram: int = Field(1, ge=1, le=64, description="shortest n-gram looked up")

    @model_validator(mode="after")
    def _ordered(self) -> "PromptLookupOptions":
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"strategy.min_ngram: {self.min_ngram} is above max_ngram {self.max_ngram}; set "
                             "min_ngram <= max_ngram")
        return self


class PromptLookupDrafter:
    """Looks the sequence's last n tokens up in its own context, longest n first, latest match first."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        pass  # no state: the context is searched afresh each round

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self._lookup(r.tokens, r.k), None) for r in requests]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # latest match first
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

    def release(self, seq_id: int) -> None:
        pass

    def slots_in_use(self) -> int:
        return 0


class PromptLookup(Method):
    name = "prompt-lookup"
    summary = "n-gram drafts from the context (no draft model)"
    Options = PromptLookupOptions

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, PromptLookupOptions)
        return self.draft_then_verify(PromptLookupDrafter(options.max_ngram, options.min_ngram), options)


METHOD = PromptLookup()
