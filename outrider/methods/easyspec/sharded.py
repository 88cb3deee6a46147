"""EasySpec's layer groups split across N draft group actors: member j hosts layer group[j] of every group (its
weights and its K/V); member 0 also holds the embedding, the final norm and the head, and leads.

The group itself (a leader call with a `follow` call to every other member, the torch.distributed group, faults)
is `outrider.actors.draft_groups`'s; this is what each member computes. Per draft forward the leader broadcasts

    header  [op, B, fuzzy]                         op: FORWARD or END (the call is over: followers return)
    table   [B × (seq_id, slot, start, rows)]      where each sequence's rows go; `start` is also the leader's
                                                   rollback, so followers never see a truncate message
    then    `forward_across`: the embeddings, then per group the members' results (see there).

Followers need no token ids (they receive h) and no draft tokens: fuzzy K/V are dropped by the next round's
calibration, and its rollback point arrives as `start`. The leader checks the KV capacity before it sends a
header, so a request that is too long fails on the leader alone and the followers still get their END.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from outrider.methods.easyspec.drafter import VARIANTS, LayerParallelDrafter, forward_across
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.config import ModelConfig
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import Collective, Draft, DraftRequest, DraftSeq

END, FORWARD = 0, 1  # header op codes
HEADER = 3  # [op, B, fuzzy]
ROW = 4  # one table row per sequence: seq_id, slot, start, rows


class OwnedLayersCache(KVCache):
    """A KV cache holding only some (not contiguous) layers: index i of `keys` is layer i, None when another
    member owns it. Drafters never compact (that is the tree-verifying target's operation)."""

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
        raise NotImplementedError("a draft group member's cache is never compacted")


class ShardedDrafter(LayerParallelDrafter):
    """`LayerParallelDrafter` whose forwards run across the group members (`forward_across`), as rank `rank` of
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
        self.comm: Collective | None = None  # the members' torch.distributed group, once joined

    def report(self) -> dict:
        return super().report() | {"rank": self.rank, "layers": self.owned}

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
        self.model.check_capacity(batch, self.cache)  # a too-long request fails here, the followers idle
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

    def _comm(self) -> Collective:
        if self.comm is None:
            raise RuntimeError("the draft group actors have not joined their torch.distributed group")
        return self.comm


def _keep_only(model: Transformer, owned: list[int], head: bool) -> None:
    """Drop the weights this member does not compute with: other members' layers, and (off rank 0) the
    embedding and head."""
    w = model.weights
    for i in range(model.num_layers):
        if i not in owned:
            w.layers[i] = None  # type: ignore[call-overload]
    if not head:
        w.embed = w.embed.new_empty(0, w.embed.shape[1])  # not a view: the table's memory goes
        w.head = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Sharded:
    """The group drafter factory: member `rank` of `world` drafts EasySpec's groups of `world` layers."""

    variant: str = "attention"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown EasySpec variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")

    def __call__(self, model: Transformer, num_slots: int, capacity: int, rank: int, world: int) -> ShardedDrafter:
        return ShardedDrafter(model, num_slots, capacity, rank, world, self.variant)
