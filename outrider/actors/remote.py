"""The engine's seams (`TargetModel`, `Drafter`) over Ray actors: the loop runs unchanged whether its models are
in this process or on placed devices.

Per round the target costs one blocking call (score). Everything else is sent without waiting: Ray runs one
caller's calls on an actor in submission order, so a truncate or release sent now is applied before the next
score, and the cache lengths are mirrored here instead of asked for.
"""
from __future__ import annotations

import numpy as np
import ray
import torch

from outrider.actors.worker import TreeRows, from_wire
from outrider.runtime.loading import parse_dtype
from outrider.scheduler.drafters import Draft, DraftRequest


class ActorTarget:
    """A target model hosted by one actor, or split by layers over several stage actors (a pipeline: each stage
    passes its hidden states to the next as a Ray object reference, without coming back here)."""

    def __init__(self, stages: list):
        self.stages = stages
        infos = ray.get([s.info.remote() for s in stages])
        self.vocab_size = infos[-1]["vocab_size"]
        self.capacity = min(i["capacity"] for i in infos)
        self.dtype = parse_dtype(infos[-1]["dtype"])
        self.lengths: dict[int, int] = {}  # slot -> positions held, mirrored from the calls we sent
        self.link = None  # a GlooLink to the last stage when the profile's transport is gloo

    def acquire(self) -> int:
        slots = ray.get([s.acquire.remote() for s in self.stages])
        assert len(set(slots)) == 1, f"stage caches out of step: slots {slots}"
        self.lengths[slots[0]] = 0
        return slots[0]

    def release(self, slot: int) -> None:
        self.lengths.pop(slot, None)
        for s in self.stages:
            s.release.remote(slot)

    def prefill(self, slot: int, tokens: list[int]) -> None:
        if tokens:
            ray.get(self._chain("prefill", slot, tokens))  # blocking: a too-long prompt must fail here
        self.lengths[slot] += len(tokens)

    def score(self, slots: list[int], token_lists: list[list[int]],
              trees: list[TreeRows | None] | None = None) -> list[torch.Tensor]:
        """Chains, or with `trees` each sequence's rows as a draft tree (see TreeRows)."""
        if self.link is not None:
            try:
                hidden = self._chain("score", slots, token_lists, stages=self.stages[:-1], trees=trees)
                logits = self.link.score(slots, token_lists, hidden, trees).view(self.dtype).float()
            except BaseException:
                self.link = None  # the link closed itself; later rounds go through Ray
                raise
        else:
            logits = from_wire(ray.get(self._chain("score", slots, token_lists, trees=trees)), self.dtype).float()
        # .float() is exact: the values were computed in self.dtype
        for slot, tokens in zip(slots, token_lists):
            self.lengths[slot] += len(tokens)
        return list(logits.split([len(t) for t in token_lists]))

    def truncate(self, slot: int, length: int) -> None:
        assert 0 <= length <= self.lengths[slot], (length, self.lengths[slot])
        if length != self.lengths[slot]:
            for s in self.stages:
                s.truncate.remote(slot, length)
            self.lengths[slot] = length

    def compact(self, slot: int, start: int, keep: list[int]) -> None:
        """Keep an accepted tree path (rows start+keep[i] → start+i) in every stage."""
        for s in self.stages:
            s.compact.remote(slot, start, keep)
        self.lengths[slot] = start + len(keep)

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def slots_in_use(self) -> list[int]:
        """Per stage, as the actors count them (tests assert a released request returns to the baseline)."""
        return [i["slots_in_use"] for i in ray.get([s.info.remote() for s in self.stages])]

    def _chain(self, method: str, *args, stages: list | None = None, **kwargs) -> ray.ObjectRef | None:
        """Call `method` on each stage in order, handing each the previous stage's hidden states (a reference:
        Ray moves them stage to stage without passing through here)."""
        ref = None
        for s in self.stages if stages is None else stages:
            ref = getattr(s, method).remote(*args, hidden=ref, **kwargs)
        return ref


class ActorDrafter:
    """A `ModelDrafter` in an actor. Sampling draws from the sequence's own generator: its state goes with the
    request and comes back advanced, so the draws equal an in-process drafter's."""

    def __init__(self, actor, overlap_prefill: bool = True):
        self.actor = actor
        self.overlap_prefill = overlap_prefill

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        """The engine prefills the drafter first, then the target. On its own device the draft's prefill runs
        while the target's does (nothing to wait for: it is ordered before the first propose). Sharing the
        target's cores, overlapping only slows the target's prefill, which decides the time to first token
        (measured on 2 cores: 1.89 s against 1.38 s), so then it waits."""
        ref = self.actor.prefill.remote(seq_id, tokens)
        if not self.overlap_prefill:
            ray.get(ref)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        wire = [{"seq_id": r.seq_id, "tokens": r.tokens, "k": r.k, "params": r.params,
                 "rng": None if r.generator is None else r.generator.get_state().numpy()} for r in requests]
        replies = ray.get(self.actor.propose.remote(wire))
        drafts = []
        for r, reply in zip(requests, replies):
            if reply["rng"] is not None:
                r.generator.set_state(torch.from_numpy(np.array(reply["rng"], dtype=np.uint8)))
            probs = None if reply["probs"] is None else torch.from_numpy(np.array(reply["probs"]))
            drafts.append(Draft(reply["tokens"], probs))
        return drafts

    def release(self, seq_id: int) -> None:
        self.actor.release.remote(seq_id)

    def slots_in_use(self) -> int:
        return ray.get(self.actor.info.remote())["slots_in_use"]
