"""A draft split over N Ray actors that talk torch.distributed among themselves (a method's draft group: each
member hosts a `GroupMember` its method's `GroupDrafterFactory` builds).

Protocol. The scheduler sends each drafting call (prefill, propose) to member 0 — the *leader*, which drafts as a
drafter in one actor would — and at the same time a `follow` call to every other member. Inside those calls the
members talk only torch.distributed (gloo; nccl on GPUs), never Ray; the leader tells the followers when the call
is over. Release and reset go to every member through Ray, in order with the drafting calls.

Faults: a failed call makes every member drop its sequences (`Recovery`); the torch.distributed group may be
stuck mid-collective, so it is formed afresh before the next drafting call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from outrider.actors.remote import ActorDrafter, Recovery
from outrider.actors.transport import GroupComm, free_port
from outrider.actors.worker import DraftWorker, ModelSource, to_wire
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import NO_DRAFT, DraftRequest, GroupDrafterFactory, GroupMember


@dataclass(frozen=True)
class Member:
    """Member `rank` of `world` as the `DrafterFactory` a `DraftWorker` takes."""

    factory: GroupDrafterFactory
    rank: int
    world: int

    def __call__(self, model: Transformer, num_slots: int, capacity: int, kept_ids: torch.Tensor | None) -> GroupMember:
        assert kept_ids is None, "a draft group member drafts over the whole vocabulary"
        return self.factory(model, num_slots, capacity, self.rank, self.world)


class DraftShard(DraftWorker):
    """The Ray actor of one draft group member (see the module docstring)."""

    def __init__(self, source: ModelSource, num_slots: int, capacity: int, threads: int | None,
                 factory: GroupDrafterFactory, rank: int, world: int):
        super().__init__(source, num_slots, capacity, threads, Member(factory, rank, world))
        self.member: GroupMember = self.drafter  # type: ignore[assignment]

    def address(self) -> str:
        """Where the group's torch.distributed store listens: this node, a free port (asked of rank 0)."""
        host = ray.util.get_node_ip_address()
        return f"tcp://{host}:{free_port(host)}"

    def join(self, url: str, world: int, backend: str, timeout_s: float) -> None:
        self.member.comm = GroupComm(url, self.member.rank, world, backend, timeout_s)

    def follow(self) -> int:
        t0 = time.perf_counter()
        try:
            return self.member.follow()
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def kv(self, seq_id: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """This member's K/V of a sequence, per layer it holds: [kv_heads, length, head_dim] each, wire format
        (for checks)."""
        cache, slot = self.drafter.cache, self.drafter.seqs[seq_id].slot
        n = cache.lengths[slot]
        return {i: (to_wire(k[slot, :, :n]), to_wire(v[slot, :, :n]))
                for i, (k, v) in enumerate(zip(cache.keys, cache.values)) if k is not None}


class ActorGroupDrafter(ActorDrafter):
    """The engine's `Drafter` over N `DraftShard` actors: drafting calls go to the leader, each with a `follow`
    call to every other actor; release and reset go to all of them."""

    def __init__(self, actors: list, overlap_prefill: bool = True, timeout_s: float | None = None,
                 backend: str = "gloo"):
        super().__init__(actors[0], overlap_prefill, timeout_s)
        self.actors = actors
        self.recovery = Recovery(actors, timeout_s)
        self.backend = backend
        # A collective waits at most this long for the others (then raises, and recovery starts).
        self.collective_timeout_s = timeout_s or 300.0
        self._joined_at: int | None = None  # recovery.failures when the group was last formed
        self._join()

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        if self._joined():
            super().prefill(seq_id, tokens)

    def submit(self, requests: list[DraftRequest]):
        if not self._joined():
            return lambda: [NO_DRAFT] * len(requests)  # plain rounds until the actors are back
        return super().submit(requests)

    def release(self, seq_id: int) -> None:
        for a in self.actors:
            a.release.remote(seq_id)

    def slots_in_use(self) -> int:
        return max(self.slots_per_actor())

    def slots_per_actor(self) -> list[int]:
        if not self.recovery.ready():
            return [0] * len(self.actors)
        return [i["slots_in_use"] for i in ray.get([a.info.remote() for a in self.actors])]

    def _send(self, method: str, *args) -> list:
        follow = [a.follow.remote() for a in self.actors[1:]]
        return [getattr(self.actor, method).remote(*args), *follow]

    def _joined(self) -> bool:
        """Whether the actors form their group: after a failure it is formed again once they answer."""
        if not self.recovery.ready():
            return False
        if self._joined_at == self.recovery.failures:
            return True
        try:
            self._join()
        except Exception as e:  # noqa: BLE001 — a lost draft only pauses speculation
            self.recovery.failed(e)
            return False
        return True

    def _join(self) -> None:
        url = ray.get(self.actor.address.remote(), timeout=self.recovery.timeout_s)
        ray.get([a.join.remote(url, len(self.actors), self.backend, self.collective_timeout_s)
                 for a in self.actors], timeout=self.recovery.timeout_s)
        self._joined_at = self.recovery.failures
