"""EasySpec (layer-parallel drafting, ALGORITHMS §3): fuzzy draft steps, then an exact calibration pass.

The draft's layers are split into groups of N consecutive layers whose members all read the group's input
(`Transformer.forward_grouped`): on N devices a group costs about one layer, at the price of approximate hidden
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

Within one process the members of a group run one after another, so the fuzzy step is no faster here; the
timers report what each phase costs so the N-device figure can be modelled (a group ≈ its slowest member).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from outrider.runtime.model import ForwardBatch, Transformer
from outrider.scheduler.drafters import DraftRequest, ModelDrafter

VARIANTS = ("attention", "layer")  # ALGORITHMS 3.2: A = parallel attention sub-layers, B = whole layers


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
        super().prefill(seq_id, tokens)
        self.exact_len[seq_id] = len(self.seqs[seq_id].fed)

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        self.exact_len.pop(seq_id, None)

    def _sync(self, requests: list[DraftRequest]) -> list[torch.Tensor]:
        """Forget every fuzzy entry first: the base rollback then keeps min(common prefix, exact_len)."""
        for r in requests:
            seq = self._seq(r.seq_id)
            del seq.fed[self.exact_len.get(r.seq_id, 0):]
        return super()._sync(requests)

    def _feed(self, requests: list[DraftRequest], token_lists: list[list[int]],
              logits: bool = True) -> list[torch.Tensor]:
        active = [(r, t) for r, t in zip(requests, token_lists) if t]
        drafting = [self.cache.lengths[self.seqs[r.seq_id].slot] >= len(r.tokens) for r, _ in active]
        assert all(drafting) or not any(drafting), "one forward must not mix committed tokens and drafts"
        t0 = self._clock()
        if any(drafting) and self.fuzzy:
            out = self._feed_fuzzy(active, logits)
            self.timers.fuzzy_seconds += self._clock() - t0
            self.timers.fuzzy_steps += 1
            return out
        for r, _ in active:
            assert len(self.seqs[r.seq_id].fed) <= self.exact_len.get(r.seq_id, 0), "exact rows after fuzzy ones"
        out = super()._feed(requests, token_lists, logits)
        for r, _ in active:
            self.exact_len[r.seq_id] = len(self.seqs[r.seq_id].fed)
        if any(drafting):
            self.timers.exact_seconds += self._clock() - t0
            self.timers.exact_steps += 1
        else:
            self.timers.calibration_seconds += self._clock() - t0
            self.timers.calibration_passes += 1
            self.timers.calibration_rows += sum(len(t) for _, t in active)
        return out

    def _feed_fuzzy(self, active: list[tuple[DraftRequest, list[int]]], logits: bool) -> list[torch.Tensor]:
        """One draft step through the parallel groups; its K/V entries are fuzzy (exact_len stays put)."""
        seqs = [self.seqs[r.seq_id] for r, _ in active]
        batch = ForwardBatch.chain([s.slot for s in seqs], [t for _, t in active],
                                   [self.cache.lengths[s.slot] for s in seqs], self.model.device)
        last = torch.tensor(batch.num_rows).cumsum(0) - 1
        out = self.model.forward_grouped(batch, self.cache, self.groups, self.whole_layers,
                                         logits_rows=last if logits else last[:0])
        for seq, (_, t) in zip(seqs, active):
            seq.fed += t
        return list(out.logits) if logits else []

    def _clock(self) -> float:
        if self.model.device.type == "cuda":  # host sync: time the kernels, not their launch
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()
