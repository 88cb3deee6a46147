"""Multi-draft speculative sampling ("Towards Optimal Multi-Draft Speculative Decoding", Hu et al., ICLR 2025):
at each drafted position the draft model proposes n tokens, not one, drawn by a chosen scheme (with replacement,
without replacement, or the paper's greedy drafts); the verifier matched to the scheme accepts one of them or
recovers, and the output keeps the target's exact distribution. The n drafts of a position are the children of one
tree node: the `expand` most probable children of each depth get n children of their own, down to depth k.

Sampled requests gain from the width (a single sampled draft is rejected more often than a greedy one). Greedy
requests take the draft's n most probable tokens at each node and verify them as a deterministic tree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.methods.multi_draft.schemes import SCHEMES, VERIFIERS, SamplingName, VerifierName
from outrider.methods.tree import TreeDrafter, _Grown
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import Draft, DraftRequest
from outrider.scheduler.policy import MAX_DRAFT, MAX_TREE_NODES
from outrider.scheduler.sampling import warp


def tree_nodes(n: int, expand: int, k: int) -> int:
    """Nodes of the full tree: n under the root, then n under each of `expand` nodes per depth, k deep."""
    return n + (k - 1) * min(expand, n) * n


class MultiDraftOptions(StrategyOptions):
    name: Literal["multi-draft"] = "multi-draft"
    k: int = Field(4, ge=1, le=MAX_DRAFT, description="deepest draft node (tree depth)")
    drafts: int = Field(2, ge=1, le=8, description="drafts per position: children of each expanded node")
    expand: int = Field(1, ge=1, le=8, description="nodes given children per depth below the root (the most "
                                                   "probable)")
    sampling: SamplingName = Field("greedy", description="how the n drafts are drawn from the draft's "
                                   "distribution: with-replacement (i.i.d.), without-replacement (Gumbel-top-n) or "
                                   "greedy (the n-1 most probable and one draw from the rest; the default: its "
                                   "verifier reaches its optimum, the highest that `bench multi-draft` measured)")
    verifier: Literal["auto"] | VerifierName = Field("auto", description="the sibling verifier: auto is the one "
                                                     "lossless for the sampling (rrs, rrs-without-replacement, "
                                                     "greedy-draft); another is refused")

    @model_validator(mode="after")
    def _fits(self) -> "MultiDraftOptions":
        nodes = tree_nodes(self.drafts, self.expand, self.k)
        if nodes > MAX_TREE_NODES:
            raise ValueError(f"strategy.drafts: drafts={self.drafts}, expand={self.expand} and k={self.k} make a "
                             f"tree of {nodes} nodes, above {MAX_TREE_NODES}; lower drafts, expand or k")
        own = SCHEMES[self.sampling].verifier
        if self.verifier not in ("auto", own):
            raise ValueError(f"strategy.verifier: {self.verifier} is not lossless for drafts drawn "
                             f"{self.sampling}; the verifier for them is {own} (or verifier auto)")
        return self

    @property
    def rule(self) -> VerifierName:
        return SCHEMES[self.sampling].verifier


@dataclass(frozen=True)
class MultiDraftFactory:
    """The `DrafterFactory` of `MultiDraftDrafter`."""

    n: int
    expand: int
    sampling: SamplingName

    def __call__(self, model: Transformer, num_slots: int, capacity: int,
                 kept_ids: torch.Tensor | None) -> "MultiDraftDrafter":
        return MultiDraftDrafter(model, self.n, self.expand, self.sampling, num_slots, capacity, kept_ids)


class MultiDraftDrafter(TreeDrafter):
    """A `TreeDrafter` whose children are the scheme's n draws from the warped draft distribution (its top n for
    greedy requests), with every node verified: the tree's shape never depends on the drafted tokens' own values,
    which keeps each node's children exactly the scheme's draws."""

    def __init__(self, model: Transformer, n: int, expand: int, sampling: SamplingName, num_slots: int = 1,
                 capacity: int = 4096, kept_ids: torch.Tensor | None = None):
        # TreeDrafter's width is the frontier: the `expand` most probable nodes of a depth grow children
        super().__init__(model, expand, MAX_TREE_NODES, num_slots, capacity, kept_ids=kept_ids, fit_cost=False)
        self.n = n
        self.draw = SCHEMES[sampling].draw
        self.q_rows: dict[int, dict[int, torch.Tensor]] = {}  # seq_id -> node -> the full-vocabulary q it came from

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        self.q_rows = {r.seq_id: {} for r in requests}
        return super().propose(requests)

    def children(self, tree: _Grown, parent: int, row: torch.Tensor, r: DraftRequest) -> list[int]:
        if r.params.greedy:
            return tree.add_children(parent, row, min(self.n, self._vocab()), self._token)
        q = warp(row[None], r.params)[0]  # over the draft's columns
        full = self._full(q)
        nodes = []
        for column in self.draw(q, self.n, r.generator).tolist():  # host sync
            node = tree.add_node(parent, self._token(column), float(torch.log(q[column])))
            self.q_rows[r.seq_id][node] = full
            nodes.append(node)
        return nodes

    def _draft(self, r: DraftRequest, tree: _Grown, seconds: float) -> Draft:
        """Every node grown, in the order grown (parents first)."""
        rows = self.q_rows.get(r.seq_id, {})
        probs = torch.stack([rows[i] for i in range(len(tree.tokens))]) if rows else None
        return Draft(list(tree.tokens), probs, list(tree.parents))


class MultiDraft(Method):
    name = "multi-draft"
    summary = "n drafts per position, drawn with or without replacement or greedily, under a verifier exact for them"
    Options = MultiDraftOptions
    uses_draft_model = True
    drafts_trees = True

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, MultiDraftOptions)
        factory = MultiDraftFactory(options.drafts, options.expand, options.sampling)
        parts = self.draft_then_verify(env.model_drafter(factory), options)
        return dataclasses.replace(parts, sibling_rule=VERIFIERS[options.rule])


METHOD = MultiDraft()
