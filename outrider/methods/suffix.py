"""Suffix drafting (SuffixDecoding, Oliaro et al. 2024): no draft model. The sequence's own prompt and output, and a
bounded pool of earlier requests' outputs, are searched for the longest match of the context's suffix; what followed
the matches is merged into a tree weighted by how often each continuation occurred, and the most frequent paths
are drafted together. Deterministic proposals, so verification is sample-and-match and the output is the target's.

The shared pool makes a request faster when its text resembles text other clients received before; that is a timing
side channel between clients, so `pool: off` keeps each request to its own text.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.scheduler.drafters import Draft, DraftRequest
from outrider.scheduler.policy import MAX_DRAFT, MAX_TREE_NODES, TreeBudget, node_depths

_SCAN = 64  # latest occurrences of a key examined per lookup: bounds the cost of very common n-grams


class SuffixOptions(StrategyOptions):
    name: Literal["suffix"] = "suffix"
    k: int = Field(MAX_DRAFT, ge=1, le=MAX_DRAFT, description="deepest draft node (tokens ahead of the context)")
    max_nodes: int = Field(12, ge=1, le=MAX_TREE_NODES, description="most draft tree nodes per round")
    min_match: int = Field(2, ge=1, le=16, description="shortest context suffix that counts as a match")
    max_match: int = Field(32, ge=1, le=256, description="longest context suffix matched (the search depth)")
    spec_factor: float = Field(2.0, gt=0, le=64, description="tree nodes per matched token: a longer match drafts "
                                                              "more (capped by max_nodes)")
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
    def _ordered(self) -> "SuffixOptions":
        if self.min_match > self.max_match:
            raise ValueError(f"strategy.min_match: {self.min_match} is above max_match {self.max_match}; set "
                             "min_match <= max_match")
        return self


@dataclass
class _Doc:
    """A token list indexed by its n-grams: `index[key]` holds the end positions e with tokens[e-n:e] == key."""

    n: int
    tokens: list[int] = field(default_factory=list)
    index: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    indexed: int = 0  # end positions below this are in the index

    def extend_to(self, tokens: list[int]) -> None:
        """Index `tokens`, reusing the work done for a prefix of them (a sequence grows between rounds)."""
        if len(tokens) < len(self.tokens) or tokens[:len(self.tokens)] != self.tokens:
            self.tokens, self.index, self.indexed = [], {}, 0
        self.tokens = list(tokens)
        # end positions e with a continuation (e < len): the last position is the query, never its own match
        for e in range(max(self.indexed, self.n), len(self.tokens)):
            self.index.setdefault(tuple(self.tokens[e - self.n:e]), []).append(e)
        self.indexed = max(self.indexed, len(self.tokens))

    def matches(self, context: list[int], max_match: int) -> list[tuple[int, int]]:
        """(match length, end position) of the latest occurrences of the context's last n tokens."""
        found = []
        for e in reversed(self.index.get(tuple(context[-self.n:]), [])[-_SCAN:]):
            length = self.n
            while (length < max_match and e - length - 1 >= 0 and length < len(context)
                   and self.tokens[e - length - 1] == context[-length - 1]):
                length += 1
            found.append((length, e))
        return found


class SuffixPool:
    """Earlier requests' text, bounded in tokens, oldest evicted first; safe to share between threads."""

    def __init__(self, n: int, max_tokens: int):
        self.n, self.max_tokens = n, max_tokens
        self.docs: deque[_Doc] = deque()
        self.tokens = 0
        self.lock = threading.Lock()

    def add(self, tokens: list[int]) -> None:
        tokens = tokens[-self.max_tokens:]
        if len(tokens) <= self.n:
            return
        doc = _Doc(self.n)
        doc.extend_to(tokens)
        with self.lock:
            self.docs.append(doc)
            self.tokens += len(tokens)
            while self.tokens > self.max_tokens:
                self.tokens -= len(self.docs.popleft().tokens)

    def matches(self, context: list[int], max_match: int) -> list[tuple[int, _Doc, int]]:
        with self.lock:
            docs = list(self.docs)
        return [(length, doc, e) for doc in docs for length, e in doc.matches(context, max_match)]

    def report(self) -> dict:
        with self.lock:
            return {"pool_requests": len(self.docs), "pool_tokens": self.tokens,
                    "pool_index_entries": sum(len(d.index) for d in self.docs)}


@dataclass
class _Seq:
    own: _Doc
    prompt_len: int


class SuffixDrafter:
    """Drafts a tree of the continuations that followed the longest matches of the context's suffix."""

    def __init__(self, options: SuffixOptions):
        self.o = options
        self.pool = SuffixPool(options.min_match, options.pool_tokens) if options.pool == "shared" else None
        self.seqs: dict[int, _Seq] = {}
        self.budget = TreeBudget()
        self.counts = {"proposals": 0, "matched": 0, "match_tokens": 0, "nodes": 0}

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        self.seqs[seq_id] = _Seq(_Doc(self.o.min_match), len(tokens) + 1)  # the prompt's last token is pending

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._propose(r) for r in requests]

    def _propose(self, r: DraftRequest) -> Draft:
        seq = self.seqs.setdefault(r.seq_id, _Seq(_Doc(self.o.min_match), len(r.tokens)))
        seq.own.extend_to(r.tokens)
        self.budget.settle(r.seq_id, r.tokens)
        self.counts["proposals"] += 1
        if r.k < 1 or len(r.tokens) < self.o.min_match:
            return Draft([], None)
        found = [(length, seq.own, e) for length, e in seq.own.matches(r.tokens, self.o.max_match)]
        if self.pool is not None:
            found += self.pool.matches(r.tokens, self.o.max_match)
        if not found:
            return Draft([], None)
        longest = max(length for length, _, _ in found)
        ends = [(doc, e) for length, doc, e in found if length == longest]
        budget = min(self.o.max_nodes, math.ceil(self.o.spec_factor * longest))
        tokens, parents, shares = best_paths([doc.tokens[e:e + r.k] for doc, e in ends], budget, self.o.min_prob)
        costs = r.verify_seconds if self.o.fit_cost else None
        n = self.budget.size(shares, node_depths(parents), costs, 0.0)  # drafting is all but free
        tokens, parents = tokens[:n], parents[:n]
        self.budget.record(r.seq_id, len(r.tokens), tokens, parents, shares[:n])
        self.counts["matched"] += 1
        self.counts["match_tokens"] += longest
        self.counts["nodes"] += len(tokens)
        return Draft(tokens, None, parents)

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        self.budget.forget(seq_id)
        if seq is not None and self.pool is not None:
            # the output, after the prompt's tail (so a later request's context can reach the output's start)
            self.pool.add(seq.own.tokens[max(0, seq.prompt_len - self.o.max_match):])

    def slots_in_use(self) -> int:
        return 0

    def report(self) -> dict:
        """Counters a draft actor adds to its info, and `outrider bench` to a run's stats."""
        c = self.counts
        return {"match_rate": round(c["matched"] / c["proposals"], 4) if c["proposals"] else 0.0,
                "mean_match_length": round(c["match_tokens"] / c["matched"], 3) if c["matched"] else 0.0,
                "mean_tree_nodes": round(c["nodes"] / c["matched"], 3) if c["matched"] else 0.0,
                **(self.pool.report() if self.pool is not None else {})}


def best_paths(continuations: list[list[int]], budget: int,
               min_prob: float) -> tuple[list[int], list[int], list[float]]:
    """Merge `continuations` into a trie counting how many pass through each node, and keep the `budget` nodes
    with the highest share of them (at least `min_prob`), most shared first: (tokens, parents, shares). A node's
    share never exceeds its parent's, so ranking by share, shallower first on ties, puts every parent before its
    children, and any leading part of the ranking is a tree."""
    trie_tokens: list[int] = []
    trie_parent: list[int] = []
    counts: list[int] = []
    depths: list[int] = []
    children: list[dict[int, int]] = [{}]  # children[i + 1]: node i's children by token; children[0]: the root's
    for cont in continuations:
        node = -1
        for token in cont:
            child = children[node + 1].get(token)
            if child is None:
                child = len(trie_tokens)
                children[node + 1][token] = child
                trie_tokens.append(token)
                trie_parent.append(node)
                counts.append(0)
                depths.append(depths[node] + 1 if node >= 0 else 1)
                children.append({})
            counts[child] += 1
            node = child
    total = len(continuations)
    ranked = sorted(range(len(trie_tokens)), key=lambda i: (-counts[i], depths[i], i))
    order = [i for i in ranked[:budget] if counts[i] / total >= min_prob]
    new_index = {old: new for new, old in enumerate(order)}
    return ([trie_tokens[i] for i in order], [new_index[trie_parent[i]] if trie_parent[i] >= 0 else -1
                                              for i in order], [counts[i] / total for i in order])


class Suffix(Method):
    name = "suffix"
    summary = "a tree of continuations of the context's longest suffix match in this and earlier requests' text"
    Options = SuffixOptions
    drafts_trees = True

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, SuffixOptions)
        return self.draft_then_verify(SuffixDrafter(options), options)


METHOD = Suffix()
