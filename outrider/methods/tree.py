"""Dynamic draft trees (EAGLE-2, Li et al. 2024, with the draft model in place of a feature head): grow a tree of
the draft model's candidates level by level, expanding only the `branching` nodes of highest cumulative draft
probability at each depth, then keep the `max_nodes` most probable nodes of everything grown for one verification.
The tree's shape follows the draft's confidence in every round: a confident draft grows a deep narrow tree, an
unsure one a wide shallow tree. Candidates are the draft's top tokens, not samples, so they verify as deterministic
proposals (sample-and-match) and the output stays the target's, greedy or sampled.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import NO_DRAFT, Draft, DraftRequest, ModelDrafter
from outrider.scheduler.policy import MAX_DRAFT, MAX_TREE_NODES, TreeBudget, follow_path, node_depths


class TreeOptions(StrategyOptions):
    name: Literal["tree"] = "tree"
    k: int = Field(4, ge=1, le=MAX_DRAFT, description="deepest draft node (tree depth)")
    branching: int = Field(2, ge=1, le=8, description="nodes expanded per depth, and children considered per node")
    max_nodes: int = Field(8, ge=1, le=MAX_TREE_NODES, description="most tree nodes verified per round")
    fit_cost: bool = Field(True, description="verify only the leading nodes worth their measured verify time "
                                             "(off: max_nodes every round)")

    @model_validator(mode="after")
    def _fits(self) -> "TreeOptions":
        if self.max_nodes < self.k:
            raise ValueError(f"strategy.max_nodes: {self.max_nodes} nodes cannot reach depth k={self.k}; set "
                             "max_nodes >= k")
        if self.branching * (self.k - 1) > MAX_TREE_NODES:  # the nodes fed to the draft must fit the verify room
            raise ValueError(f"strategy.branching: {self.branching} nodes per depth over depth k={self.k} feeds "
                             f"{self.branching * (self.k - 1)} nodes to the draft, above {MAX_TREE_NODES}; lower "
                             "branching or k")
        return self


@dataclass
class _Grown:
    """One sequence's tree while it grows: node i has `tokens[i]`, `parents[i]` and cumulative log-probability
    `scores[i]`; `fed[i]` is its column among the nodes already in the draft cache (-1: a leaf not fed)."""

    base: int  # the draft cache length before the tree (the committed tokens, pending one included)
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    fed_nodes: list[int] = field(default_factory=list)  # node of each fed column

    def add_children(self, parent: int, row: torch.Tensor, width: int, token_of) -> list[int]:
        """Add the `width` most probable children of `parent` (-1: the pending token) from its logits row."""
        logp = torch.log_softmax(row.float(), dim=-1)
        top = torch.topk(logp, width)
        return [self.add_node(parent, token_of(column), lp) for lp, column in zip(top.values.tolist(),
                                                                                  top.indices.tolist())]

    def add_node(self, parent: int, token: int, logp: float) -> int:
        """A child of `parent` (-1: the pending token) with draft log-probability `logp`; its index."""
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append((self.scores[parent] if parent >= 0 else 0.0) + logp)
        self.fed.append(-1)
        return len(self.tokens) - 1

    def ancestors(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out

    def ranked(self, max_nodes: int) -> tuple[list[int], list[int], list[float]]:
        """The `max_nodes` most probable nodes, most probable first: (tokens, parents, path probabilities). A
        child's probability never exceeds its parent's and ties go to the earlier (shallower) node, so every
        parent comes before its children and any leading part of the ranking is a tree."""
        order = sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))[:max_nodes]
        index = {old: new for new, old in enumerate(order)}
        return ([self.tokens[i] for i in order], [index[self.parents[i]] if self.parents[i] >= 0 else -1
                                                  for i in order], [math.exp(self.scores[i]) for i in order])


@dataclass(frozen=True)
class TreeFactory:
    """The `DrafterFactory` of `TreeDrafter`."""

    width: int
    max_nodes: int
    fit_cost: bool = True

    def __call__(self, model: Transformer, num_slots: int, capacity: int,
                 kept_ids: torch.Tensor | None) -> "TreeDrafter":
        return TreeDrafter(model, self.width, self.max_nodes, num_slots, capacity, kept_ids=kept_ids,
                           fit_cost=self.fit_cost)


class TreeDrafter(ModelDrafter):
    """Grows each sequence's tree with one batched draft forward per depth. The fed nodes' K/V stays in the draft
    cache until the next round, which keeps the accepted path's (compacted to where a chain's would be) and feeds
    only the tokens after it, as a chain drafter feeds only the bonus token."""

    def __init__(self, model: Transformer, width: int, max_nodes: int, num_slots: int = 1, capacity: int = 4096,
                 kept_ids: torch.Tensor | None = None, fit_cost: bool = True):
        super().__init__(model, num_slots, capacity, kept_ids=kept_ids)
        self.width, self.max_nodes, self.fit_cost = width, max_nodes, fit_cost
        self.grown: dict[int, _Grown] = {}  # each sequence's last tree, whose fed nodes are in the cache
        self.budget = TreeBudget()

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        t0 = time.perf_counter()
        live = [r for r in requests if r.k > 0]
        if not live:
            return [NO_DRAFT for _ in requests]
        grown = self.grow(live, self.start_round(live), {r.seq_id: r.k for r in live})
        seconds = time.perf_counter() - t0
        return [self._draft(r, grown[r.seq_id], seconds) if r.seq_id in grown else NO_DRAFT for r in requests]

    def start_round(self, live: list[DraftRequest]) -> list[torch.Tensor]:
        """Learn from and drop last round's trees, sync the cache to the committed tokens; the logits after each
        pending token."""
        for r in live:
            self.budget.settle(r.seq_id, r.tokens)
            self._keep_accepted(r)
        return self._sync(live)

    def grow(self, live: list[DraftRequest], rows: list[torch.Tensor], depth: dict[int, int]) -> dict[int, _Grown]:
        """Each sequence's tree from its root logits `rows`, `depth[seq_id]` levels deep (one draft forward per
        level past the first, all sequences batched)."""
        grown = {r.seq_id: _Grown(self.cache.lengths[self.seqs[r.seq_id].slot]) for r in live}
        frontier = {r.seq_id: self._most_probable(grown[r.seq_id], self.children(grown[r.seq_id], -1, row, r))
                    for r, row in zip(live, rows)}
        for level in range(1, max(depth.values())):
            deeper = [r for r in live if depth[r.seq_id] > level]
            if not deeper:
                break
            rows_at = self._feed_tree(deeper, grown, frontier, level)
            for r in deeper:
                tree, children = grown[r.seq_id], []
                for node, row in zip(frontier[r.seq_id], rows_at[r.seq_id]):
                    children += self.children(tree, node, row, r)
                frontier[r.seq_id] = self._most_probable(tree, children)
        self.grown.update(grown)
        return grown

    def _most_probable(self, tree: _Grown, nodes: list[int]) -> list[int]:
        """The frontier of the next depth: the `width` most probable of `nodes`."""
        return sorted(nodes, key=lambda i: -tree.scores[i])[:self.width]

    def children(self, tree: _Grown, parent: int, row: torch.Tensor, r: DraftRequest) -> list[int]:
        """Add `parent`'s children (-1: the pending token's) from its draft logits `row`: its `width` most
        probable tokens. The frontier of the next depth is the `width` most probable of all children added."""
        return tree.add_children(parent, row, self._width(), self._token)

    def _draft(self, r: DraftRequest, tree: _Grown, seconds: float) -> Draft:
        """The leading nodes of the ranking worth their verify time."""
        tokens, parents, probs = tree.ranked(self.max_nodes)
        n = self.budget.size(probs, node_depths(parents), r.verify_seconds if self.fit_cost else None, seconds)
        self.budget.record(r.seq_id, tree.base, tokens[:n], parents[:n], probs[:n])
        return Draft(tokens[:n], None, parents[:n])

    def _keep_accepted(self, r: DraftRequest) -> None:
        """Drop last round's tree from the cache but the fed nodes along the committed tokens, moved to their
        chain positions; the sync after it feeds the rest."""
        tree = self.grown.pop(r.seq_id, None)
        if tree is None:
            return
        seq = self.seqs[r.seq_id]
        if r.tokens[:tree.base] != seq.fed:  # rolled back past the tree's root: the sync re-feeds what differs
            self.cache.truncate(seq.slot, tree.base)
            return
        # committed after the tree's root, through fed nodes only; the pending token is fed anew
        path = follow_path(tree.tokens, tree.parents, r.tokens[tree.base:-1], tree.fed_nodes)
        self.cache.compact(seq.slot, tree.base, [tree.fed[n] for n in path])
        seq.fed = seq.fed[:tree.base] + [tree.tokens[n] for n in path]

    def release(self, seq_id: int) -> None:
        self.grown.pop(seq_id, None)
        self.budget.forget(seq_id)
        super().release(seq_id)

    def reset(self) -> None:
        self.grown.clear()
        super().reset()

    def _width(self) -> int:
        return min(self.width, self._vocab())

    def _vocab(self) -> int:
        """Tokens the draft can propose (its head's columns)."""
        return self.model.config.vocab_size if self.kept_ids is None else len(self.kept_ids)

    def _feed_tree(self, requests: list[DraftRequest], grown: dict[int, _Grown], frontier: dict[int, list[int]],
                   depth: int) -> dict[int, list[torch.Tensor]]:
        """Feed each sequence's frontier (its nodes at `depth`) under a mask over the tree nodes already fed;
        returns each frontier node's logits row."""
        slots, ids, pos, num_rows, masks = [], [], [], [], []
        for r in requests:
            tree, nodes = grown[r.seq_id], frontier[r.seq_id]
            prior = len(tree.fed_nodes)
            mask = torch.zeros(len(nodes), prior + len(nodes), dtype=torch.bool)
            for i, node in enumerate(nodes):
                for a in tree.ancestors(tree.parents[node]):
                    mask[i, tree.fed[a]] = True
                mask[i, prior + i] = True
                tree.fed[node] = prior + i
            tree.fed_nodes += nodes
            slots.append(self.seqs[r.seq_id].slot)
            ids += [tree.tokens[n] for n in nodes]
            pos += [tree.base + depth - 1] * len(nodes)  # every node at depth d sits where a chain's d-th draft would
            num_rows.append(len(nodes))
            masks.append(mask)
        device = self.model.device
        batch = ForwardBatch(torch.tensor(ids, dtype=torch.long, device=device),
                             torch.tensor(pos, dtype=torch.long, device=device), slots, num_rows, masks)
        logits = self.model.forward(batch, self.cache).logits.split(num_rows)
        return {r.seq_id: list(rows) for r, rows in zip(requests, logits)}


class Tree(Method):
    name = "tree"
    summary = "the draft model grows a tree of its most probable candidates, expanded where it is confident"
    Options = TreeOptions
    uses_draft_model = True
    drafts_trees = True

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, TreeOptions)
        factory = TreeFactory(options.branching, options.max_nodes, options.fit_cost)
        return self.draft_then_verify(env.model_drafter(factory), options)


METHOD = Tree()
