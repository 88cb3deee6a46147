"""EasySpec's layer groups split across N draft actors (ALGORITHMS 3.8): actor j hosts layer group[j] of every
group (its weights and its K/V); actor 0 also holds the embedding, the final norm and the head, and drives.

Protocol. The scheduler sends each drafting call (prefill, propose) to actor 0 — the *leader*, which runs the
usual `LayerParallelDrafter` round (sync, calibration, fuzzy steps, sampling) — and at the same time a
`follow` call to every other actor. Inside those calls the actors talk only torch.distributed (gloo; nccl on
GPUs), never Ray: per draft forward the leader broadcasts

    header  [op, B, fuzzy]                         op: FORWARD or END (the call is over: followers return)
    table   [B × (seq_id, slot, start, rows)]      where each sequence's rows go; `start` is also the leader's
                                                   rollback, so followers never see a truncate message
    then    `forward_across`: the embeddings, then per group the members' results (see there).

Followers need no token ids (they receive h) and no draft tokens: fuzzy K/V are dropped by the next round's
calibration, and its rollback point arrives as `start`. Release and reset go to every actor through Ray, in
order with the drafting calls. The leader checks the KV capacity before it sends a header, so a request that
is too long fails on the leader alone and the followers still get their END.

Faults: a failed call makes every actor drop its sequences (`Recovery`); the torch.distributed group may be
stuck mid-collective, so it is formed afresh before the next drafting call.
"""
from __future__ import annotations

import time

import numpy as np
import ray
import torch

from outrider.actors.remote import ActorDrafter, Recovery
from outrider.actors.transport import GroupComm, free_port
from outrider.actors.worker import DraftWorker, FaultPlan, ModelSource, set_threads, to_wire
from outrider.runtime.config import ModelConfig
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.model import ForwardBatch, Transformer
from outrider.scheduler.drafters import NO_DRAFT, Draft, DraftRequest, DraftSeq
from outrider.scheduler.easyspec import LayerParallelDrafter, forward_across

END, FORWARD = 0, 1  # header op codes
HEADER = 3  # [op, B, fuzzy]
ROW = 4  # one table row per sequence: seq_id, slot, start, rows


class OwnedLayersCache(KVCache):
    """A KV cache holding only some (not contiguous) layers: index i of `keys` is layer i, None when another
    actor owns it. Drafters never compact (that is the tree-verifying target's operation)."""

    @classmethod
    def allocate_owned(cls, config: ModelConfig, num_slots: int, capacity: int, dtype: torch.dtype,
                       device: torch.device, owned: list[int]) -> "OwnedLayersCache":
        shape = (num_slots, config.num_kv_heads, capacity, config.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) if i in owned else None
                for i in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) if i in owned else None
                  for i in range(config.num_layers)]
        return cls(keys, values, 0, [0] * num_slots, list(range(num_slots))[::-1])

    @property
    def capacity(self) -> int:
        return next(k for k in self.keys if k is not None).shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def compact(self, slot: int, start: int, keep: list[int]) -> None:
        raise NotImplementedError("a draft group actor's cache is never compacted")


class ShardedDrafter(LayerParallelDrafter):
    """`LayerParallelDrafter` whose forwards run across the group actors (`forward_across`), as rank `rank` of
    `world`: the group size is `world`. Rank 0 leads (drafts, samples); the others `follow`."""

    def __init__(self, model: Transformer, num_slots: int, capacity: int, rank: int, world: int,
                 variant: str = "attention"):
        if model.num_layers < world:
            raise ValueError(f"the draft model has {model.num_layers} layers, too few to split over {world} "
                             f"draft group actors; give placement.draft at most {model.num_layers} stages")
        # The base allocates a cache for every layer: a one-slot, one-position one, replaced just below.
        super().__init__(model, 1, 1, group_size=world, variant=variant)
        self.rank = rank
        self.owned = [g[rank] for g in self.groups if len(g) > rank]  # a group of one layer belongs to rank 0
        self.cache = OwnedLayersCache.allocate_owned(model.config, num_slots, min(capacity, model.max_positions),
                                                     model.dtype, model.device, self.owned)
        _keep_only(model, self.owned, rank == 0)
        self.comm: GroupComm | None = None

    # -- leader (rank 0) ---------------------------------------------------------------------------------------

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        try:
            super().prefill(seq_id, tokens)
        finally:
            self._end()

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        try:
            return super().propose(requests)
        finally:
            self._end()

    def _forward(self, batch: ForwardBatch, fuzzy: bool, logits_rows: torch.Tensor) -> torch.Tensor:
        assert self.rank == 0, "only the leader drafts"
        comm = self._comm()
        starts = [self.cache.lengths[s] for s in batch.slots]
        self.model._check_positions(batch, self.cache, starts)  # a too-long request fails here, followers idle
        seq_of = {seq.slot: seq_id for seq_id, seq in self.seqs.items()}
        comm.broadcast_ints([FORWARD, len(batch.slots), int(fuzzy)], HEADER)
        comm.broadcast_ints([v for slot, start, n in zip(batch.slots, starts, batch.num_rows)
                             for v in (seq_of[slot], slot, start, n)], ROW * len(batch.slots))
        return forward_across(self.model, batch, self.cache, self.groups, comm, fuzzy, self.whole_layers,
                              logits_rows)

    def _end(self) -> None:
        if self.comm is not None and self.rank == 0:
            self.comm.broadcast_ints([END, 0, 0], HEADER)

    # -- followers (rank > 0) --------------------------------------------------------------------------------

    def follow(self) -> int:
        """Run the leader's forwards with this rank's layers until it sends END; returns how many ran."""
        assert self.rank > 0, "the leader drafts; it does not follow"
        comm, forwards = self._comm(), 0
        while True:
            op, num_seqs, fuzzy = comm.broadcast_ints(None, HEADER)
            if op == END:
                return forwards
            table = comm.broadcast_ints(None, ROW * num_seqs)
            rows = [table[i:i + ROW] for i in range(0, len(table), ROW)]
            for seq_id, slot, start, _ in rows:
                self.cache.truncate(self._hold(seq_id, slot), start)  # the leader's rollback, if any
            batch = ForwardBatch.chain([r[1] for r in rows], [[0] * r[3] for r in rows], [r[2] for r in rows],
                                       self.model.device)  # token ids unused: h comes from the leader
            forward_across(self.model, batch, self.cache, self.groups, comm, bool(fuzzy), self.whole_layers, None)
            forwards += 1

    def _hold(self, seq_id: int, slot: int) -> int:
        """The leader's slot for a sequence this follower first hears of, taken in this cache too."""
        if seq_id not in self.seqs:
            self.seqs[seq_id] = DraftSeq(self.cache.acquire(slot))
        assert self.seqs[seq_id].slot == slot, (seq_id, slot, self.seqs[seq_id].slot)
        return slot

    def _comm(self) -> GroupComm:
        if self.comm is None:
            raise RuntimeError("the draft group actors have not joined their torch.distributed group")
        return self.comm


def _keep_only(model: Transformer, owned: list[int], head: bool) -> None:
    """Drop the weights this actor does not compute with: other members' layers, and (off rank 0) the
    embedding and head."""
    w = model.weights
    for i in range(model.num_layers):
        if i not in owned:
            w.layers[i] = None  # type: ignore[call-overload]
    if not head:
        w.embed = w.embed.new_empty(0, w.embed.shape[1])  # not a view: the table's memory goes
        w.head = None  # type: ignore[assignment]


class DraftShard(DraftWorker):
    """The Ray actor of one draft group member: a `ShardedDrafter` of rank `rank` (see the module docstring)."""

    def __init__(self, source: ModelSource, num_slots: int, capacity: int, threads: int | None, rank: int,
                 world: int, variant: str = "attention"):
        set_threads(threads)
        self.drafter = ShardedDrafter(source.load(), num_slots, capacity, rank, world, variant)
        self.busy_seconds = 0.0  # as DraftWorker's (not calling its constructor: it would load another drafter)
        self.prefill_seconds = 0.0
        self.faults = FaultPlan()

    def address(self) -> str:
        """Where the group's torch.distributed store listens: this node, a free port (asked of rank 0)."""
        host = ray.util.get_node_ip_address()
        return f"tcp://{host}:{free_port(host)}"

    def join(self, url: str, world: int, backend: str, timeout_s: float) -> None:
        self.drafter.comm = GroupComm(url, self.drafter.rank, world, backend, timeout_s)

    def follow(self) -> int:
        t0 = time.perf_counter()
        try:
            return self.drafter.follow()
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def info(self) -> dict:
        return super().info() | {"rank": self.drafter.rank, "layers": self.drafter.owned,
                                 "timers": self.drafter.timers.as_dict()}

    def kv(self, seq_id: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """This actor's K/V of a sequence, per owned layer: [kv_heads, length, head_dim] each, wire format
        (for checks)."""
        cache, slot = self.drafter.cache, self.drafter.seqs[seq_id].slot
        n = cache.lengths[slot]
        return {i: (to_wire(cache.keys[i][slot, :, :n]), to_wire(cache.values[i][slot, :, :n]))
                for i in self.drafter.owned}


class ActorGroupDrafter(ActorDrafter):
    """The engine's `Drafter` over N `DraftShard` actors: drafting calls go to the leader, each with a `follow`
    call to every other actor; release and reset go to all of them."""

    def __init__(self, actors: list, overlap_prefill: bool = True, timeout_s: float | None = None,
                 backend: str = "gloo"):
        super().__init__(actors[0], overlap_prefill, timeout_s, layer_group=len(actors))
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

