"""RASD, retrieval-augmented speculative decoding (Quan et al. 2025): continuations retrieved for the context's
suffix (from the request's own text, a pool of earlier requests' outputs and an optional tokenized corpus) are
pruned by the draft model's distribution at the root, then fused with the draft model's tree by longest-prefix
matching into one tree, verified in one target forward. Every node is a deterministic proposal (the draft's top
tokens, or retrieved text), verified by sample-and-match, so the output is the target's.

The paper fixes no pruning rule; ours keeps a continuation whose first token is among the draft's `prune_top` most
probable, or has draft probability at least `prune_prob`. Where the retrieved match is long (`confident_match`
tokens), the round trusts it and grows the draft tree no further than its root's children, so copying text costs
one draft forward instead of `draft_depth`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.methods.suffix import MatchOptions
from outrider.methods.tree import TreeDrafter, _Grown
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import NO_DRAFT, Draft, DraftRequest
from outrider.scheduler.policy import MAX_DRAFT, MAX_TREE_NODES, node_depths
from outrider.scheduler.retrieval import Corpus, best_paths


class RasdOptions(MatchOptions):
    name: Literal["rasd"] = "rasd"
    draft_depth: int = Field(3, ge=1, le=MAX_DRAFT, description="levels of the draft model's own tree")
    branching: int = Field(1, ge=1, le=8, description="nodes expanded per depth, and children considered per node")
    confident_match: int = Field(8, ge=1, le=256, description="a match this long grows the draft tree one level "
                                                              "only: the retrieved text carries the round")
    prune_top: int = Field(8, ge=1, le=1024, description="keep a retrieved continuation whose first token is among "
                                                         "the draft's this many most probable")
    prune_prob: float = Field(0.01, ge=0, le=1, description="... or has at least this draft probability")
    corpus: str | None = Field(None, description="a datastore from `outrider rasd-corpus`, tokenized for this "
                                                 "target (none: no corpus)")

    @model_validator(mode="after")
    def _consistent(self) -> "RasdOptions":
        if self.draft_depth > self.k:
            raise ValueError(f"strategy.draft_depth: {self.draft_depth} is deeper than k={self.k}; set "
                             "draft_depth <= k")
        if self.branching * (self.draft_depth - 1) > MAX_TREE_NODES:
            raise ValueError(f"strategy.branching: {self.branching} nodes per depth over draft_depth "
                             f"{self.draft_depth} feeds {self.branching * (self.draft_depth - 1)} nodes to the "
                             f"draft, above {MAX_TREE_NODES}; lower branching or draft_depth")
        return self


def load_corpus(path: str) -> Corpus:
    """The corpus file `strategy.corpus` names, or a message saying how to make one."""
    try:
        return Corpus.load(path)
    except ValueError as e:
        raise ValueError(f"strategy.corpus: {e}; build one with `outrider rasd-corpus`") from None


@dataclass
class _Fused:
    """The draft tree with retrieved paths grafted on: node i has `tokens[i]`, `parents[i]` and `scores[i]`, an
    estimate that it is accepted (draft path probability, or a continuation's share, never above its parent's)."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]

    @classmethod
    def of(cls, tree: _Grown) -> "_Fused":
        return cls(list(tree.tokens), list(tree.parents), [math.exp(s) for s in tree.scores])

    def graft(self, tokens: list[int], parents: list[int], shares: list[float]) -> None:
        """Longest-prefix fusion: each retrieved node (parents first) joins the child of its fused parent that
        has its token, or becomes a new child there."""
        where: list[int] = []
        for token, parent, share in zip(tokens, parents, shares):
            under = -1 if parent < 0 else where[parent]
            node = next((i for i, (t, p) in enumerate(zip(self.tokens, self.parents)) if p == under and t == token),
                        -1)
            cap = 1.0 if under < 0 else self.scores[under]
            if node < 0:
                node = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(under)
                self.scores.append(min(share, cap))
            else:
                self.scores[node] = max(self.scores[node], min(share, cap))
            where.append(node)
        for i, parent in enumerate(self.parents):  # a raised node lifts no child above it: keep scores monotone
            if parent >= 0:
                self.scores[i] = min(self.scores[i], self.scores[parent])

    def ranked(self, max_nodes: int) -> tuple[list[int], list[int], list[float]]:
        """The `max_nodes` best nodes, best first; ties go to the shallower node, so parents come first."""
        depths = node_depths(self.parents)
        order = sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], depths[i], i))[:max_nodes]
        index = {old: new for new, old in enumerate(order)}
        return ([self.tokens[i] for i in order], [index[self.parents[i]] if self.parents[i] >= 0 else -1
                                                  for i in order], [self.scores[i] for i in order])


@dataclass(frozen=True)
class RasdFactory:
    """The `DrafterFactory` of `RasdDrafter` (picklable: the corpus is loaded where the drafter runs)."""

    options: RasdOptions

    def __call__(self, model: Transformer, num_slots: int, capacity: int,
                 kept_ids: torch.Tensor | None) -> "RasdDrafter":
        return RasdDrafter(model, self.options, num_slots, capacity, kept_ids)


class RasdDrafter(TreeDrafter):
    """The draft model's tree (`TreeDrafter`) fused with retrieved continuations it does not rule out."""

    def __init__(self, model: Transformer, options: RasdOptions, num_slots: int = 1, capacity: int = 4096,
                 kept_ids: torch.Tensor | None = None):
        super().__init__(model, options.branching, options.max_nodes, num_slots, capacity, kept_ids=kept_ids,
                         fit_cost=options.fit_cost)
        self.o = options
        self.retriever = options.retriever(load_corpus(options.corpus) if options.corpus else None)
        self.counts = {"proposals": 0, "retrieved": 0, "confident": 0, "grafted": 0}

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        super().prefill(seq_id, tokens)
        self.retriever.start(seq_id, len(tokens) + 1)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        t0 = time.perf_counter()
        live = [r for r in requests if r.k > 0]
        if not live:
            return [NO_DRAFT for _ in requests]
        rows = self.start_round(live)
        retrieved = {r.seq_id: self._retrieve(r, row) for r, row in zip(live, rows)}
        depth = {r.seq_id: 1 if retrieved[r.seq_id][0] else min(self.o.draft_depth, r.k) for r in live}
        grown = self.grow(live, rows, depth)
        seconds = time.perf_counter() - t0
        return [self._fuse(r, grown[r.seq_id], retrieved[r.seq_id][1], seconds) if r.seq_id in grown else NO_DRAFT
                for r in requests]

    def _retrieve(self, r: DraftRequest, root: torch.Tensor) -> tuple[bool, list[list[int]]]:
        """(whether the match is long enough to carry the round, the continuations the draft does not rule out)."""
        self.counts["proposals"] += 1
        longest, continuations = self.retriever.continuations(r.seq_id, r.tokens, r.k)
        if not continuations:
            return False, []
        q = torch.softmax(root.float(), dim=-1)
        top = set(torch.topk(q, min(self.o.prune_top, q.shape[-1])).indices.tolist())
        kept = [c for c in continuations if self._column(c[0]) in top or self._q(q, c[0]) >= self.o.prune_prob]
        confident = bool(kept) and longest >= self.o.confident_match
        self.counts["retrieved"] += bool(kept)
        self.counts["confident"] += confident
        return confident, kept

    def _column(self, token: int) -> int:
        """The draft logits column of `token` (-1: trimmed out of the draft's vocabulary)."""
        if self.kept_ids is None:
            return token
        hit = (self.kept_ids == token).nonzero()
        return int(hit[0, 0]) if len(hit) else -1

    def _q(self, q: torch.Tensor, token: int) -> float:
        column = self._column(token)
        return float(q[column]) if column >= 0 else 0.0

    def _fuse(self, r: DraftRequest, tree: _Grown, continuations: list[list[int]], seconds: float) -> Draft:
        fused = _Fused.of(tree)
        if continuations:
            tokens, parents, shares = best_paths(continuations, MAX_TREE_NODES, self.o.min_prob)
            before = len(fused.tokens)
            fused.graft(tokens, parents, shares)
            self.counts["grafted"] += len(fused.tokens) - before
        tokens, parents, scores = fused.ranked(self.max_nodes)
        n = self.budget.size(scores, node_depths(parents), r.verify_seconds if self.fit_cost else None, seconds)
        self.budget.record(r.seq_id, tree.base, tokens[:n], parents[:n], scores[:n])
        return Draft(tokens[:n], None, parents[:n])

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        self.retriever.finish(seq_id)

    def report(self) -> dict:
        c = self.counts
        share = {k: round(c[k] / c["proposals"], 4) if c["proposals"] else 0.0 for k in ("retrieved", "confident")}
        return {"retrieved_rate": share["retrieved"], "confident_rate": share["confident"],
                "grafted_nodes": c["grafted"], **self.retriever.report()}


class Rasd(Method):
    name = "rasd"
    summary = "retrieved continuations pruned by the draft model and fused with its tree"
    Options = RasdOptions
    uses_draft_model = True
    drafts_trees = True

    def check(self, options: StrategyOptions, profile: Any) -> None:
        assert isinstance(options, RasdOptions)
        target = profile.models.target.model
        if options.corpus and (made_for := load_corpus(options.corpus).target) != target:
            raise ValueError(f"strategy.corpus: tokenized for {made_for!r}, not for the target {target!r} (token ids "
                             f"mean nothing in another vocabulary); rebuild it with `outrider rasd-corpus --target "
                             f"{target}`")

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, RasdOptions)
        return self.draft_then_verify(env.model_drafter(RasdFactory(options)), options)

    def commands(self, sub: argparse._SubParsersAction) -> None:
        c = sub.add_parser("rasd-corpus", help="tokenize a folder of text for rasd's retrieval datastore")
        c.add_argument("--target", required=True, help="the target it is for (built-in name, HF folder or .gguf), "
                                                       "spelled as the profile spells it")
        c.add_argument("--corpus", required=True, help="a folder (searched recursively) or a file")
        c.add_argument("--glob", default="*.py", help="files taken from a folder (default *.py)")
        c.add_argument("--max-tokens", type=int, default=2_000_000, help="stop after this many tokens")
        c.add_argument("--out", required=True, help="where to write the datastore (.npz)")
        c.set_defaults(func=cmd_rasd_corpus)


def cmd_rasd_corpus(a: argparse.Namespace) -> int:
    """Tokenize the corpus files in sorted order (reproducible), each followed by EOS, up to --max-tokens."""
    from outrider.hub import resolve
    from outrider.runtime.checkpoint import load_checkpoint
    from outrider.runtime.tokenizer import Tokenizer

    root = Path(a.corpus).expanduser()
    files = sorted(root.rglob(a.glob)) if root.is_dir() else [root] if root.is_file() else []
    if not files:
        raise ValueError(f"--corpus: no {a.glob} file under {root}; give a folder of text files or a file")
    if a.max_tokens < 16:
        raise ValueError(f"--max-tokens must be >= 16, got {a.max_tokens}")
    ckpt = load_checkpoint(resolve(a.target))
    tokenizer = Tokenizer.load(ckpt.tokenizer_source)
    eos = tokenizer.eos_token_ids[0]
    ids: list[int] = []
    used = 0
    for f in files:
        try:
            ids += tokenizer.encode(f.read_text(encoding="utf-8")) + [eos]
            used += 1
        except (UnicodeDecodeError, OSError) as e:
            print(f"skipped {f}: {e}", file=sys.stderr)
        if len(ids) >= a.max_tokens:
            break
    corpus = Corpus(np.array(ids[:a.max_tokens], dtype=np.int32), 2, a.target, ckpt.config.vocab_size)
    corpus.save(Path(a.out))
    print(f"wrote {a.out}: {len(corpus.tokens)} tokens from {used} of {len(files)} files for {a.target}")
    return 0


METHOD = Rasd()
