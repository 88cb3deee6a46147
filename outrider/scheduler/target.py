"""The seam between the speculative loop and wherever the target model runs.

The engine talks to a `TargetModel`; `LocalTarget` runs a `Transformer` in this process (tests, `outrider
generate`), an actor-backed implementation runs it on a placed device. The loop does not know which.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from outrider.runtime.batch import ForwardBatch, TreeRows
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.model import Transformer
from outrider.runtime.prefix_cache import HeldTokens

PREFILL_CHUNK = 256  # rows per prefill forward: bounds activation memory; the kernels make any chunking exact


class TargetModel(Protocol):
    vocab_size: int
    capacity: int  # KV positions per sequence

    def acquire(self) -> int: ...  # a cache slot for a new sequence

    def release(self, slot: int) -> None: ...

    def prefill(self, slot: int, tokens: list[int]) -> int:
        """Append tokens' K/V to a new sequence's empty slot, no logits; returns how many leading tokens it copied
        from K/V the cache already held (`runtime.prefix_cache`) instead of computing them."""
        ...

    def score(self, slots: list[int], token_lists: list[list[int]],
              trees: list[TreeRows | None] | None = None) -> list[torch.Tensor]:
        """Append each sequence's rows and return their logits, one [rows_b, vocab] float32 tensor each. With
        `trees`, a sequence's rows are its pending token and a draft tree (its entry None: a chain)."""
        ...

    def truncate(self, slot: int, length: int) -> None: ...

    def compact(self, slot: int, start: int, keep: list[int]) -> None:
        """Keep an accepted tree path: positions start + keep[i] move to start + i, the rest is dropped."""
        ...

    def length(self, slot: int) -> int: ...

    def slots_in_use(self) -> list[int]: ...  # per stage of the model (one for a whole model)


class FeatureSource(Protocol):
    def features(self, slot: int) -> torch.Tensor:
        """[scored, hidden] the target's last-layer hidden state at each position of the slot it has scored."""
        ...


@runtime_checkable
class FeatureTarget(Protocol):
    """A target that can record its last layer's hidden states, for a drafter that drafts from them."""

    def record_features(self) -> FeatureSource: ...  # from now on; what to read them from


def features_of(target: TargetModel) -> FeatureSource:
    """The target recording its hidden states, for a drafter that drafts from them; refused at build, never
    mid-request, where the target cannot."""
    if not isinstance(target, FeatureTarget):
        raise ValueError(f"this drafter needs the target's hidden states, which {type(target).__name__} does not "
                         "record: a draft head runs with the target in this process only, not through actors yet, "
                         "nor with graph steps; drop the draft head (the strategy then drafts with the draft model) "
                         "or run the target locally")
    return target.record_features()


class LocalTarget:
    """A Transformer and its KV cache in this process."""

    def __init__(self, model: Transformer, num_slots: int = 1, capacity: int = 4096):
        self.model = model
        self.cache: KVCache = model.new_cache(num_slots, capacity)
        self.held = HeldTokens(num_slots)
        self.vocab_size = model.config.vocab_size
        self.capacity = self.cache.capacity
        # [slots, capacity, hidden] the last layer's output at every position written, once a drafter asks
        # (`record_features`); a slot's valid rows are its cache length, so truncate rolls them back too
        self.recorded: torch.Tensor | None = None

    def acquire(self) -> int:
        slot = self.cache.acquire()
        self.held.acquired(slot)
        return slot

    def release(self, slot: int) -> None:
        self.cache.release(slot)
        self.held.released(slot)

    def prefill(self, slot: int, tokens: list[int]) -> int:
        reused = self._reuse(slot, tokens)
        rest = tokens[reused:]
        self.held.appended(slot, rest)
        if self.recorded is None:
            self.model.prefill(self.cache, slot, rest, PREFILL_CHUNK)
            return reused
        for i in range(0, len(rest), PREFILL_CHUNK):  # Transformer.prefill's chunks, keeping the features
            part = rest[i:i + PREFILL_CHUNK]
            self._forward(ForwardBatch.chain([slot], [part], [self.cache.lengths[slot]], self.model.device),
                          torch.empty(0, dtype=torch.long))
        return reused

    def _reuse(self, slot: int, tokens: list[int]) -> int:
        source, reused = self.held.reuse(self.cache, slot, tokens)
        if source is not None and self.recorded is not None:  # the recorded hidden states come with their K/V
            self.recorded[slot, :reused] = self.recorded[source, :reused]
        return reused

    def score(self, slots: list[int], token_lists: list[list[int]],
              trees: list[TreeRows | None] | None = None) -> list[torch.Tensor]:
        starts = [self.cache.lengths[s] for s in slots]
        batch = ForwardBatch.rows(slots, token_lists, starts, trees, self.model.device)
        logits = self._forward(batch)
        for b, (slot, tokens) in enumerate(zip(slots, token_lists)):
            self.held.appended(slot, tokens, tree=bool(trees and trees[b] is not None))
        return list(logits.split(batch.num_rows))

    def record_features(self) -> "LocalTarget":
        """Keep the last layer's hidden states from now on, for a drafter that drafts from them."""
        if self.recorded is None:
            c = self.model.config
            self.recorded = torch.zeros(self.cache.num_slots, self.capacity, c.hidden_size, dtype=self.model.dtype,
                                        device=self.model.device)
        return self

    def features(self, slot: int) -> torch.Tensor:
        """[length, hidden] the recorded hidden states of the slot's scored positions (a view, no copy)."""
        assert self.recorded is not None, "record_features() first"
        return self.recorded[slot, :self.cache.lengths[slot]]

    def _forward(self, batch: ForwardBatch, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.recorded is None:
            return self.model.forward(batch, self.cache, logits_rows).logits
        starts = [self.cache.lengths[s] for s in batch.slots]
        last = self.model.num_layers
        out = self.model.forward(batch, self.cache, logits_rows, hidden_layers=(last,))
        for slot, start, h in zip(batch.slots, starts, out.hidden[last].split(batch.num_rows)):
            self.recorded[slot, start:start + h.shape[0]] = h
        return out.logits

    def truncate(self, slot: int, length: int) -> None:
        self.cache.truncate(slot, length)
        self.held.truncated(slot, length)

    def compact(self, slot: int, start: int, keep: list[int]) -> None:
        if self.recorded is not None:  # the recorded hidden states follow their K/V
            src = torch.tensor([start + i for i in keep], dtype=torch.long, device=self.recorded.device)
            self.recorded[slot, start:start + len(keep)] = self.recorded[slot, src]
        self.cache.compact(slot, start, keep)
        self.held.compacted(slot, start, keep)

    def length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def slots_in_use(self) -> list[int]:
        return [self.cache.slots_in_use]
