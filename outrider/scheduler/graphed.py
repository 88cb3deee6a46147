"""The engine's seams over static-shape steps: `GraphTarget` (a `TargetModel`) and `GraphDrafter` (a `Drafter`).

Each sequence owns a `StaticRunner` (its K/V and fixed-width forward; a CUDA graph on a GPU). The speculative loop
is the engine's, unchanged: it cannot tell these from `LocalTarget` and `ModelDrafter`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from outrider.runtime.batch import TreeRows
from outrider.runtime.graphs import DEFAULT_WIDTH, DraftLoop, StaticRunner
from outrider.runtime.model import Transformer
from outrider.runtime.prefix_cache import common_prefix
from outrider.scheduler.drafters import Draft, DraftRequest


class GraphTarget:
    """`TargetModel` over one `StaticRunner` per slot: every score and prefill chunk is one fixed-width replay."""

    def __init__(self, model: Transformer, num_slots: int = 1, capacity: int = 2048, width: int = DEFAULT_WIDTH,
                 use_graph: bool | None = None):
        self.runners = [StaticRunner(model, width, capacity, use_graph) for _ in range(num_slots)]
        self.free = list(range(num_slots))[::-1]
        self.vocab_size = model.config.vocab_size
        self.capacity = capacity
        self.width = width

    def acquire(self) -> int:
        if not self.free:
            raise RuntimeError(f"all {len(self.runners)} graph slots are in use")
        slot = self.free.pop()
        self.runners[slot].commit(0)
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def prefill(self, slot: int, tokens: list[int]) -> int:
        """Every token is computed: a runner's static cache is its own, with no prefix to share."""
        runner = self.runners[slot]
        for i in range(0, len(tokens), self.width):
            part = tokens[i:i + self.width]
            runner.run(part)
            runner.commit(runner.length + len(part))
        return 0

    def score(self, slots: list[int], token_lists: list[list[int]],
              trees: list[TreeRows | None] | None = None) -> list[torch.Tensor]:
        if trees and any(trees):
            raise ValueError("graph steps score chains only: a tree strategy runs with placement.graphs off")
        out = []
        for slot, tokens in zip(slots, token_lists):
            runner = self.runners[slot]
            out.append(runner.run(tokens).cpu())  # the verifier works on the host: one copy per round
            runner.commit(runner.length + len(tokens))
        return out

    def truncate(self, slot: int, length: int) -> None:
        self.runners[slot].commit(length)

    def compact(self, slot: int, start: int, keep: list[int]) -> None:
        raise ValueError("graph steps score chains only, so there is no tree path to keep")

    def length(self, slot: int) -> int:
        return self.runners[slot].length

    def slots_in_use(self) -> list[int]:
        return [len(self.runners) - len(self.free)]


@dataclass
class _GraphSeq:
    runner: StaticRunner
    loop: DraftLoop
    fed: list[int] = field(default_factory=list)  # tokens whose K/V the runner holds, in order


class GraphDrafter:
    """`Drafter` whose round is one `DraftLoop` replay per sequence (greedy proposals: q is a point mass)."""

    def __init__(self, model: Transformer, num_slots: int = 1, capacity: int = 2048, width: int = DEFAULT_WIDTH,
                 use_graph: bool | None = None):
        self.model, self.capacity, self.width, self.use_graph = model, capacity, width, use_graph
        self.idle = [_GraphSeq(r, DraftLoop(r)) for r in
                     (StaticRunner(model, width, capacity, use_graph) for _ in range(num_slots))]
        self.seqs: dict[int, _GraphSeq] = {}

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        self._catch_up(self._seq(seq_id), tokens, keep_last=False)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for r in requests:
            if r.k <= 0:
                drafts.append(Draft([], None))
                continue
            if not r.params.greedy:
                raise ValueError("the graph drafter proposes greedy drafts only; use the model drafter to sample")
            seq = self._seq(r.seq_id)
            pending = self._catch_up(seq, r.tokens, keep_last=True)
            runner = seq.runner
            runner.fill(pending, None, None)
            seq.loop.fed.fill_(len(pending))
            tokens = seq.loop.round(r.k).tolist()  # the round's one host sync
            # The loop wrote K/V of the pending rows and of d_1..d_{k-1}; keep them for next round's common prefix.
            seq.fed += pending + tokens[:-1]
            runner.commit(len(seq.fed))
            drafts.append(Draft(tokens, None))
        return drafts

    def _catch_up(self, seq: _GraphSeq, tokens: list[int], keep_last: bool) -> list[int]:
        """Roll back to the common prefix with `tokens` and feed the rest in full-width chunks, leaving at most
        `width` for the draft round when `keep_last`."""
        keep = common_prefix(seq.fed, tokens)
        if keep_last:
            keep = min(keep, len(tokens) - 1)  # the pending token is always fed: its logits give d_1
        seq.fed = seq.fed[:keep]
        seq.runner.commit(keep)
        rest = tokens[keep:]
        while len(rest) > (self.width if keep_last else 0):
            part = rest[:self.width]
            seq.runner.run(part)
            seq.fed += part
            seq.runner.commit(len(seq.fed))
            rest = rest[len(part):]
        return rest

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            seq.fed = []
            self.idle.append(seq)

    def slots_in_use(self) -> int:
        return len(self.seqs)

    def _seq(self, seq_id: int) -> _GraphSeq:
        if seq_id not in self.seqs:
            if not self.idle:
                raise RuntimeError("all graph drafter slots are in use")
            self.seqs[seq_id] = self.idle.pop()
        return self.seqs[seq_id]
