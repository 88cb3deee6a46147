"""Dynamic draft trees (EAGLE-2, Li et al. 2024, with the draft model in place of a feature head): grow a tree of
the draft model's candidates level by level, expanding only the `branching` nodes of highest cumulative draft
probability at each depth, then keep the `max_nodes` most probable nodes of everything grown for one verification.
The tree's shape follows the draft's confidence in every round: a confident draft grows a deep narrow tree, an
unsure one a wide shallow tree. Candidates are the draft's top tokens, not samples, so they verify as deterministic
proposals (sample-and-match) and the output stays the target's, greedy or sampled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import NO_DRAFT, Draft, DraftRequest, ModelDrafter
from outrider.scheduler.policy import MAX_DRAFT, MAX_TREE_NODES


class TreeOptions(StrategyOptions):
    name: Literal["tree"] = "tree"
    k: int = Field(5, ge=1, le=MAX_DRAFT, description="deepest draft node (tree depth)")
    branching: int = Field(3, ge=1, le=8, description="nodes expanded per depth, and children considered per node")
    max_nodes: int = Field(10, ge=1, le=MAX_TREE_NODES, description="most tree nodes verified per round")

    @model_validator(mode="after")
    def _fits(self) -> "TreeOptions":
        if self.max_nodes < self.k:
            raise ValueError(f"strategy.max_nodes: {self.max_nodes} nodes cannot reach depth k={self.k}; set "
                             "max_nodes >= k")
        if self.branching * (self.k - 1) > MAX_TREE_NODES:  # the nodes fed to the draft must fit the verify room
            raise ValueError(f"strategy.branching: {self.branching} nodes per depth over depth k={self.k} feeds "
                             f"{self.branching * (self.k - 1)} nodes to the draft, above {MAX_TREE_NODES}; lower branching "
                             "or k")
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
        base = self.scores[parent] if parent >= 0 else 0.0
        new = []
        for lp, column in zip(top.values.tolist(), top.indices.tolist()):
            new.append(len(self.tokens))
            self.tokens.append(token_of(column))
            self.parents.append(parent)
            self.scores.append(base + lp)
            self.fed.append(-1)
        return new

    def ancestors(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out

    def best(self, max_nodes: int) -> Draft:
        """The `max_nodes` most probable nodes, renumbered parents first. A child's score never exceeds its
        parent's and ties go to the earlier (shallower) node, so the kept nodes form a tree."""
        ranked = sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))[:max_nodes]
        order = sorted(ranked)
        index = {old: new for new, old in enumerate(order)}
        return Draft([self.tokens[i] for i in order], None,
                     [index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in order])


@dataclass(frozen=True)
class TreeFactory:
    """The `DrafterFactory` of `TreeDrafter`."""

    width: int
    max_nodes: int

    def __call__(self, model: Transformer, num_slots: int, capacity: int,
                 kept_ids: torch.Tensor | None) -> "TreeDrafter":
        return TreeDrafter(model, self.width, self.max_nodes, num_slots, capacity, kept_ids=kept_ids)


class TreeDrafter(ModelDrafter):
    """Grows each sequence's tree with one batched draft forward per depth; the tree's K/V is dropped from the
    draft cache afterwards, and the next round's sync feeds the accepted tokens like any committed tokens."""

    def __init__(self, model: Transformer, width: int, max_nodes: int, num_slots: int = 1, capacity: int = 4096,
                 kept_ids: torch.Tensor | None = None):
        super().__init__(model, num_slots, capacity, kept_ids=kept_ids)
        self.width, self.max_nodes = width, max_nodes

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        live = [r for r in requests if r.k > 0]
        if not live:
            return [NO_DRAFT for _ in requests]
        rows = self._sync(live)  # the logits after each pending token
        grown = {r.seq_id: _Grown(self.cache.lengths[self.seqs[r.seq_id].slot]) for r in live}
        frontier = {r.seq_id: grown[r.seq_id].add_children(-1, row, self._width(), self._token)
                    for r, row in zip(live, rows)}
        for depth in range(1, max(r.k for r in live)):
            deeper = [r for r in live if r.k > depth]
            if not deeper:
                break
            rows = self._feed_tree(deeper, grown, frontier, depth)
            for r in deeper:
                tree, children = grown[r.seq_id], []
                for node, row in zip(frontier[r.seq_id], rows[r.seq_id]):
                    children += tree.add_children(node, row, self._width(), self._token)
                frontier[r.seq_id] = sorted(children, key=lambda i: -tree.scores[i])[:self.width]
        for r in live:  # the tree's K/V goes: the committed tokens stay, as a fresh prefill would leave them
            self.cache.truncate(self.seqs[r.seq_id].slot, grown[r.seq_id].base)
        return [grown[r.seq_id].best(self.max_nodes) if r.seq_id in grown else NO_DRAFT for r in requests]

    def _width(self) -> int:
        return min(self.width, self.model.config.vocab_size if self.kept_ids is None else len(self.kept_ids))

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

    def drafts_with_model(self, options: StrategyOptions) -> bool:
        return True

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, TreeOptions)
        return self.draft_then_verify(env.model_drafter(TreeFactory(options.branching, options.max_nodes)), options)


METHOD = Tree()
