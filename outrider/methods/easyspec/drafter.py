"""EasySpec ("EasySpec: Layer-Parallel Speculative Decoding for Efficient Multi-GPU Utilization", 2025): fuzzy
draft steps, then an exact calibration pass.

The draft's layers are split into groups of N consecutive layers whose members all read the group's input
(`forward_grouped`): on N devices a group costs about one layer, at the price of approximate hidden
states and approximate ("fuzzy") K/V for the draft tokens. A round is

    1. calibrate: roll the draft cache back to the last position whose K/V is exact, then run the committed
       tokens after it — last round's accepted drafts and the pending token, k + 1 rows at most — through the
       draft in ONE exact, sequential forward. It overwrites their fuzzy K/V, and its last row gives q_1 and d_1
       exactly as a sequential drafter would;
    2. draft d_2..d_k with fuzzy steps (their K/V stay fuzzy: `exact_len` does not move past them);
    3. the target verifies with the q each token was drawn from, so the output is the target's, whatever the
       approximation: fuzziness only lowers acceptance, and calibration keeps it from accumulating.

Worked example (k = 3): committed tokens t_0..t_9 (t_9 pending), draft cache exact up to 9 positions. Calibration
feeds [t_9] → d_1; fuzzy steps feed d_1 (position 10) → d_2 and d_2 (position 11) → d_3. The target accepts d_1
and adds y: committed t_0..t_9 d_1 y. Next round rolls back to min(common prefix 11, exact_len 10) = 10 and
feeds [d_1, y] exactly: position 10 is recomputed, position 11 written afresh.

Within one process the members of a group run one after another, so the fuzzy step is no faster there; the
timers report what each phase costs. `forward_across` runs the same forwards with member j of every group on
draft group actor j, the members of a group at once, combined over torch.distributed (`sharded.py`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from outrider.runtime.batch import ForwardBatch
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.model import ForwardContext, ForwardOutput, Transformer
from outrider.scheduler.drafters import Collective, DraftRequest, ModelDrafter

# What runs in parallel within a group: "attention" (only the attention sub-layers read the group input; the
# MLPs chain exactly) or "layer" (whole layers read it and their residual deltas are summed)
VARIANTS = ("attention", "layer")


@dataclass
class PhaseTimers:
    """Where the drafter's time went, summed over every round (wall clock of the draft forwards)."""

    calibration_seconds: float = 0.0  # exact forwards over committed tokens (the d_1 step included)
    calibration_passes: int = 0
    calibration_rows: int = 0  # committed tokens fed exactly: accepted drafts recomputed + pending tokens
    fuzzy_seconds: float = 0.0  # draft steps through parallel groups
    fuzzy_steps: int = 0
    exact_seconds: float = 0.0  # draft steps when no group has more than one layer (sequential drafting)
    exact_steps: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerParallel:
    """The drafter factory: `LayerParallelDrafter` with groups of `group_size` layers, in this process or inside
    a draft actor."""

    group_size: int = 2
    variant: str = "attention"

    def __call__(self, model: Transformer, num_slots: int, capacity: int,
                 kept_ids: torch.Tensor | None) -> "LayerParallelDrafter":
        return LayerParallelDrafter(model, num_slots, capacity, kept_ids=kept_ids, group_size=self.group_size,
                                    variant=self.variant)


def layer_groups(num_layers: int, group_size: int, exact_edges: int = 0) -> list[range]:
    """Consecutive layer groups: the first and last `exact_edges` layers alone, the rest in groups of
    `group_size` (the last may be shorter). Example: 8 layers, size 3, edges 1 → [0] [1 2 3] [4 5 6] [7]."""
    if group_size < 1:
        raise ValueError(f"the layer group size must be >= 1 (1 = sequential drafting), got {group_size}")
    if exact_edges < 0:
        raise ValueError(f"exact_edges must be >= 0, got {exact_edges}")
    head, tail = min(exact_edges, num_layers), max(num_layers - exact_edges, min(exact_edges, num_layers))
    middle = [range(i, min(i + group_size, tail)) for i in range(head, tail, group_size)]
    return [range(i, i + 1) for i in range(head)] + middle + [range(i, i + 1) for i in range(tail, num_layers)]


class LayerParallelDrafter(ModelDrafter):
    """`ModelDrafter` whose draft steps run the layers in parallel groups, recalibrated exactly every round.

    The base class's round is kept as is: `_sync` rolls back and feeds the committed tokens, then each step
    feeds the last draft. This class decides by position which kind of forward a feed is: rows of committed
    tokens run exact (calibration), rows past them are drafts and run fuzzy."""

    def __init__(self, model: Transformer, num_slots: int = 1, capacity: int = 4096, prefill_chunk: int = 256,
                 kept_ids: torch.Tensor | None = None, group_size: int = 2, variant: str = "attention",
                 exact_edges: int = 0):
        if variant not in VARIANTS:
            raise ValueError(f"unknown EasySpec variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        super().__init__(model, num_slots, capacity, prefill_chunk, kept_ids)
        self.groups = layer_groups(model.num_layers, group_size, exact_edges)
        self.whole_layers = variant == "layer"
        self.fuzzy = any(len(g) > 1 for g in self.groups)
        self.exact_len: dict[int, int] = {}  # seq_id -> leading draft-cache positions whose K/V are exact
        self.timers = PhaseTimers()

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        """`ModelDrafter.prefill` (exact forwards of `prefill_chunk` rows, no logits) through `_forward`."""
        seq = self._seq(seq_id)
        for i in range(0, len(tokens), self.prefill_chunk):
            part = tokens[i:i + self.prefill_chunk]
            batch = ForwardBatch.chain([seq.slot], [part], [self.cache.lengths[seq.slot]], self.model.device)
            self._forward(batch, False, torch.empty(0, dtype=torch.long))
            seq.fed += part
        self.exact_len[seq_id] = len(seq.fed)

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        self.exact_len.pop(seq_id, None)

    def report(self) -> dict:
        """Where drafting time went (a `ReportingDrafter`: a draft actor adds this to its info)."""
        return {"timers": self.timers.as_dict()}

    def _sync(self, requests: list[DraftRequest]) -> list[torch.Tensor]:
        """Forget every fuzzy entry first: the base rollback then keeps min(common prefix, exact_len)."""
        for r in requests:
            seq = self._seq(r.seq_id)
            del seq.fed[self.exact_len.get(r.seq_id, 0):]
        return super()._sync(requests)

    def _feed(self, requests: list[DraftRequest], token_lists: list[list[int]],
              logits: bool = True) -> list[torch.Tensor]:
        """One draft forward; returns, per request, the logits after its last fed token. Rows past the committed
        tokens are drafts and run fuzzy; committed rows run exact and extend `exact_len`."""
        active = [(r, t) for r, t in zip(requests, token_lists) if t]
        seqs = [self.seqs[r.seq_id] for r, _ in active]
        drafting = [self.cache.lengths[s.slot] >= len(r.tokens) for s, (r, _) in zip(seqs, active)]
        assert all(drafting) or not any(drafting), "one forward must not mix committed tokens and drafts"
        fuzzy = any(drafting) and self.fuzzy
        assert fuzzy or all(len(s.fed) <= self.exact_len.get(r.seq_id, 0) for s, (r, _) in zip(seqs, active)), \
            "exact rows after fuzzy ones"
        t0 = self._clock()
        batch = ForwardBatch.chain([s.slot for s in seqs], [t for _, t in active],
                                   [self.cache.lengths[s.slot] for s in seqs], self.model.device)
        last = batch.last_rows()
        out = self._forward(batch, fuzzy, last if logits else last[:0])
        for seq, (r, t) in zip(seqs, active):
            seq.fed += t
            if not fuzzy:
                self.exact_len[r.seq_id] = len(seq.fed)
        self._time(self._clock() - t0, fuzzy, any(drafting), sum(len(t) for _, t in active))
        return list(out) if logits else []

    def _forward(self, batch: ForwardBatch, fuzzy: bool, logits_rows: torch.Tensor) -> torch.Tensor:
        """One draft forward in this process (`ShardedDrafter` overrides it to run across group actors):
        the parallel groups when fuzzy, else every layer in order. Returns logits [len(logits_rows), vocab]."""
        if fuzzy:
            return forward_grouped(self.model, batch, self.cache, self.groups, self.whole_layers, logits_rows).logits
        return self.model.forward(batch, self.cache, logits_rows).logits

    def _time(self, seconds: float, fuzzy: bool, drafting: bool, rows: int) -> None:
        if fuzzy:
            self.timers.fuzzy_seconds += seconds
            self.timers.fuzzy_steps += 1
        elif drafting:
            self.timers.exact_seconds += seconds
            self.timers.exact_steps += 1
        else:
            self.timers.calibration_seconds += seconds
            self.timers.calibration_passes += 1
            self.timers.calibration_rows += rows

    def _clock(self) -> float:
        if self.model.device.type == "cuda":  # host sync: time the kernels, not their launch
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()


def forward_grouped(model: Transformer, batch: ForwardBatch, cache: KVCache, groups: list[range],
                    whole_layers: bool = False, logits_rows: torch.Tensor | None = None) -> ForwardOutput:
    """`Transformer.forward` with the layers in consecutive `groups` (covering 0..num_layers-1) whose members run in
    parallel from the group's input (`parallel_group`); a group of one layer is that layer, exact. With every
    group a single layer this is `forward`, bit for bit."""
    assert [i for g in groups for i in g] == list(range(model.num_layers)), groups
    ctx = model.context(batch, cache)
    h = model.embed(batch.token_ids)
    for group in groups:
        h = model.layer(group[0], h, ctx) if len(group) == 1 else parallel_group(model, group, h, ctx, whole_layers)
    ctx.advance()
    return ForwardOutput(model.logits(h if logits_rows is None else h[logits_rows]), {})


def parallel_group(model: Transformer, group: range, h: torch.Tensor, ctx: ForwardContext,
                   whole_layers: bool) -> torch.Tensor:
    """EasySpec's approximation: every layer of the group reads the group input h, so on N devices they would run
    at once. Every member after the first reads the wrong input, so its K/V are fuzzy, and so is everything after
    the group.

    attention (variant A): a_j = Attn_j(h) for all j, then exactly chained h += a_j; h += MLP_j(h).
    whole layers (variant B): Δ_j = a_j + MLP_j(h + a_j) for all j, then h += Σ_j Δ_j."""
    if whole_layers:
        deltas = []
        for index in group:
            a = model.attention(index, h, ctx)
            deltas.append(a + model.mlp(index, h + a))
        return h + torch.stack(deltas).sum(0)
    branches = [model.attention(index, h, ctx) for index in group]
    for index, a in zip(group, branches):
        h = h + a
        h = h + model.mlp(index, h)
    return h


def forward_across(model: Transformer, batch: ForwardBatch, cache: KVCache, groups: list[range], comm: Collective,
                   fuzzy: bool, whole_layers: bool, logits_rows: torch.Tensor | None) -> torch.Tensor | None:
    """`Transformer.forward` (fuzzy=False) or `forward_grouped` (fuzzy=True) with the layers spread over the group
    actors: rank j runs layer group[j] of every group (a group of one layer: rank 0), against its own K/V. Every
    rank calls this with the same batch shape; rank 0 embeds and returns the logits, the others return None.

    Every rank holds the same h between layers, and each layer runs the very ops of the in-process forward on
    the same inputs, so the logits and K/V are bitwise those of `LayerParallelDrafter` in one process:
      exact pass   layer by layer: its owner computes h = layer(h) and broadcasts it (one transfer per layer);
      attention    every member computes a_j = Attn_j(h) at once from the group input; the MLPs chain exactly,
                   so member j then adds a_j and MLP_j and broadcasts h to the next member;
      layer        every member computes Δ_j from the group input; an all_gather gives every rank all of them
                   and each sums them as `h + torch.stack([Δ_0, …, Δ_{m-1}]).sum(0)` — member order, the sum
                   `parallel_group` takes. Not an all_reduce: gloo's ring sums each chunk starting at a
                   different rank, so its bits would depend on the rank count and differ from one process's.
    The embeddings go out from rank 0 first (only rank 0 holds the embedding table and the head)."""
    rank = comm.rank
    rows = int(batch.token_ids.numel())
    h = model.embed(batch.token_ids) if rank == 0 else \
        torch.empty(rows, model.config.hidden_size, dtype=model.dtype, device=model.device)
    h = comm.broadcast(h, 0)
    ctx = model.context(batch, cache)
    for group in groups:
        if not fuzzy or len(group) == 1:
            for j, index in enumerate(group):
                if j == rank:
                    h = model.layer(index, h, ctx)
                h = comm.broadcast(h, j)
        elif whole_layers:
            delta = torch.zeros_like(h)  # a rank past a short group's members sends zeros, left out of the sum
            if rank < len(group):
                a = model.attention(group[rank], h, ctx)
                delta = a + model.mlp(group[rank], h + a)
            h = h + torch.stack(comm.all_gather(delta)[:len(group)]).sum(0)
        else:
            a = model.attention(group[rank], h, ctx) if rank < len(group) else None
            for j, index in enumerate(group):
                if j == rank:
                    h = h + a
                    h = h + model.mlp(index, h)
                h = comm.broadcast(h, j)
    ctx.advance()
    if rank != 0:
        return None
    return model.logits(h if logits_rows is None else h[logits_rows])
