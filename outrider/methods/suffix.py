"""Suffix drafting (SuffixDecoding, Oliaro et al. 2024): no draft model. The sequence's own prompt and output, and a
bounded pool of earlier requests' outputs, are searched for the longest match of the context's suffix; what followed
the matches is merged into a tree weighted by how often each continuation occurred, and the most frequent paths
are drafted together. Deterministic proposals, so verification is sample-and-match and the output is the target's.

The shared pool makes a request faster when its text resembles text other clients received before; that is a timing
side channel between clients, so `pool: off` keeps each request to its own text.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.scheduler.drafters import Draft, DraftRequest
from outrider.scheduler.policy import MAX_DRAFT, MAX_TREE_NODES, TreeBudget, node_depths
from outrider.scheduler.retrieval import Corpus, Retriever, TokenPool, best_paths


class MatchOptions(StrategyOptions):
    """What a strategy drafting from retrieved text takes: how it matches the context's suffix, the pool it also
    searches, and how many of the retrieved nodes it verifies. (No name of its own: suffix and rasd extend it.)"""

    k: int = Field(MAX_DRAFT, ge=1, le=MAX_DRAFT, description="deepest draft node (tokens ahead of the context)")
    max_nodes: int = Field(12, ge=1, le=MAX_TREE_NODES, description="most draft tree nodes verified per round")
    min_match: int = Field(2, ge=1, le=16, description="shortest context suffix that counts as a match")
    max_match: int = Field(32, ge=1, le=256, description="longest context suffix matched (the search depth)")
    min_prob: float = Field(0.1, ge=0, le=1, description="drop continuations seen in fewer than this share of "
                                                          "the matches")
    fit_cost: bool = Field(True, description="verify only the leading nodes worth their measured verify time "
                                             "(off: every node the match allows)")
    pool: Literal["shared", "off"] = Field(
        "shared", description="shared: also match earlier requests' outputs (their speed reveals whether similar "
                              "text was served before); off: each request's own prompt and output only")
    pool_tokens: int = Field(1 << 18, ge=1, le=1 << 24, description="most tokens the shared pool keeps (oldest "
                                                                     "requests evicted first)")

    @model_validator(mode="after")
    def _ordered(self) -> "MatchOptions":
        if self.min_match > self.max_match:
            raise ValueError(f"strategy.min_match: {self.min_match} is above max_match {self.max_match}; set "
                             "min_match <= max_match")
        return self

    def retriever(self, corpus: Corpus | None = None) -> Retriever:
        return Retriever(self.min_match, self.max_match, self.pool_tokens if self.pool == "shared" else None, corpus)


class SuffixOptions(MatchOptions):
    name: Literal["suffix"] = "suffix"
    spec_factor: float = Field(2.0, gt=0, le=64, description="tree nodes per matched token: a longer match drafts "
                                                              "more (capped by max_nodes)")


class SuffixDrafter:
    """Drafts a tree of the continuations that followed the longest matches of the context's suffix."""

    def __init__(self, options: SuffixOptions):
        self.o = options
        self.retriever = options.retriever()
        self.budget = TreeBudget()
        self.counts = {"proposals": 0, "matched": 0, "match_tokens": 0, "nodes": 0}

    @property
    def pool(self) -> TokenPool | None:
        return self.retriever.pool

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        self.retriever.start(seq_id, len(tokens) + 1)  # the prompt's last token is pending

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._propose(r) for r in requests]

    def _propose(self, r: DraftRequest) -> Draft:
        self.budget.settle(r.seq_id, r.tokens)
        self.counts["proposals"] += 1
        longest, continuations = self.retriever.continuations(r.seq_id, r.tokens, r.k)
        if not continuations:
            return Draft([], None)
        budget = min(self.o.max_nodes, math.ceil(self.o.spec_factor * longest))
        tokens, parents, shares = best_paths(continuations, budget, self.o.min_prob)
        costs = r.verify_seconds if self.o.fit_cost else None
        n = self.budget.size(shares, node_depths(parents), costs, 0.0)  # drafting is all but free
        tokens, parents = tokens[:n], parents[:n]
        self.budget.record(r.seq_id, len(r.tokens), tokens, parents, shares[:n])
        self.counts["matched"] += 1
        self.counts["match_tokens"] += longest
        self.counts["nodes"] += len(tokens)
        return Draft(tokens, None, parents)

    def release(self, seq_id: int) -> None:
        self.budget.forget(seq_id)
        self.retriever.finish(seq_id)

    def slots_in_use(self) -> int:
        return 0

    def report(self) -> dict:
        """Counters a draft actor adds to its info, and `outrider bench` to a run's stats."""
        c = self.counts
        return {"match_rate": round(c["matched"] / c["proposals"], 4) if c["proposals"] else 0.0,
                "mean_match_length": round(c["match_tokens"] / c["matched"], 3) if c["matched"] else 0.0,
                "mean_tree_nodes": round(c["nodes"] / c["matched"], 3) if c["matched"] else 0.0,
                **self.retriever.report()}


class Suffix(Method):
    name = "suffix"
    summary = "a tree of continuations of the context's longest suffix match in this and earlier requests' text"
    Options = SuffixOptions
    drafts_trees = True

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, SuffixOptions)
        return self.draft_then_verify(SuffixDrafter(options), options)


METHOD = Suffix()
