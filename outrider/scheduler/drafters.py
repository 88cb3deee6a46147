"""Drafters: anything that proposes the next k tokens of a sequence. The loop never asks which kind it has.

A drafter is handed the sequence's committed tokens each round (the last one is the pending token the target
has not scored yet) and syncs its own state to them; it keeps no promise from an earlier round, so rollback
after a rejection is the same code as catching up after a bonus token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from outrider.runtime.kv_cache import KVCache
from outrider.runtime.model import ForwardBatch, Transformer
from outrider.scheduler.sampling import SamplingParams, argmax, sample, warp


@dataclass
class DraftRequest:
    seq_id: int
    tokens: list[int]  # committed tokens, prompt included (then any window drafted ahead); tokens[-1] is pending
    k: int  # tokens wanted
    params: SamplingParams
    generator: torch.Generator | None
    # [scored, hidden] the target's last-layer hidden state at each position it scored (every committed token
    # but the pending one; a view of its record); only for a drafter with `wants_features = True`, else None
    features: torch.Tensor | None = None


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # [k'] proposed, k' <= k (a drafter may propose fewer)
    probs: torch.Tensor | None  # [k', vocab] the q rows the tokens were drawn from; None = deterministic proposals


NO_DRAFT = Draft([], None)


class Drafter(Protocol):
    def prefill(self, seq_id: int, tokens: list[int]) -> None: ...  # a new sequence's prompt (optional warm-up)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]: ...

    def release(self, seq_id: int) -> None: ...  # the sequence finished or was cancelled: free its state

    def slots_in_use(self) -> int: ...  # sequences holding KV in the drafter (0 for stateless drafters)


def start_proposals(drafter: Drafter, requests: list[DraftRequest]) -> Callable[[], list[Draft]]:
    """Start drafting and return what waits for the drafts. A drafter hosted elsewhere (an actor: `submit`)
    drafts meanwhile, so the caller can run the target at the same time; one in this process drafts now."""
    submit = getattr(drafter, "submit", None)
    if submit is not None:
        return submit(requests)
    drafts = drafter.propose(requests)
    return lambda: drafts


class PromptLookupDrafter:
    """n-gram drafting without a model: find the latest earlier occurrence of the sequence's last n tokens and
    propose what followed it (Saxena's prompt lookup decoding). Deterministic, so q is a point mass."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        pass  # no state: the context is searched afresh each round

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self._lookup(r.tokens, r.k), None) for r in requests]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # latest match first
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

    def release(self, seq_id: int) -> None:
        pass

    def slots_in_use(self) -> int:
        return 0


@dataclass
class DraftSeq:
    slot: int
    fed: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds, in order


class CachedSequences:
    """A drafter's sequences over its one KV cache: a slot each, taken on first sight, freed on release."""

    cache: KVCache
    seqs: dict[int, DraftSeq]

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.cache.release(seq.slot)

    def slots_in_use(self) -> int:
        return self.cache.slots_in_use

    def _seq(self, seq_id: int) -> DraftSeq:
        if seq_id not in self.seqs:
            self.seqs[seq_id] = DraftSeq(self.cache.acquire())
        return self.seqs[seq_id]


class ModelDrafter(CachedSequences):
    """A small model of the target's vocabulary drafting a chain of k tokens, all sequences batched per step."""

    def __init__(self, model: Transformer, num_slots: int = 1, capacity: int = 4096, prefill_chunk: int = 256,
                 kept_ids: torch.Tensor | None = None):
        """kept_ids [n]: the model's head was trimmed to these tokens (VocabTrim); logits column j is token
        kept_ids[j], and tokens outside are never drafted (probability 0 in q)."""
        self.model = model
        self.kept_ids = kept_ids
        self.cache = model.new_cache(num_slots, capacity)
        self.prefill_chunk = prefill_chunk
        self.seqs: dict[int, DraftSeq] = {}

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        """Feed the prompt when the sequence starts, so the first round drafts at once."""
        seq = self._seq(seq_id)
        self.model.prefill(self.cache, seq.slot, tokens, self.prefill_chunk)
        seq.fed += tokens

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        live = [r for r in requests if r.k > 0]
        tokens: dict[int, list[int]] = {r.seq_id: [] for r in requests}
        probs: dict[int, list[torch.Tensor]] = {r.seq_id: [] for r in requests}
        if live:
            logits = self._sync(live)  # catch each sequence up to its committed tokens
            for step in range(max(r.k for r in live)):
                if step:
                    live = [r for r in live if r.k > step]
                    logits = self._feed(live, [[tokens[r.seq_id][-1]] for r in live])
                for r, row in zip(live, logits):
                    if r.params.greedy:  # q is a point mass: no distribution to keep
                        tokens[r.seq_id].append(self._token(int(argmax(row))))  # host sync: next draft input
                        continue
                    q = warp(row[None], r.params)[0]
                    tokens[r.seq_id].append(self._token(int(sample(q[None], r.generator)[0])))  # host sync
                    probs[r.seq_id].append(self._full(q))
        return [Draft(tokens[r.seq_id], torch.stack(probs[r.seq_id]) if probs[r.seq_id] else None)
                for r in requests]

    def _token(self, column: int) -> int:
        return column if self.kept_ids is None else int(self.kept_ids[column])

    def _full(self, q: torch.Tensor) -> torch.Tensor:
        """q over the whole vocabulary: the kept tokens' probabilities, 0 elsewhere."""
        if self.kept_ids is None:
            return q
        return q.new_zeros(self.model.config.vocab_size).index_copy_(0, self.kept_ids, q)

    def _sync(self, requests: list[DraftRequest]) -> list[torch.Tensor]:
        """Roll each sequence's draft cache back to its common prefix with the committed tokens, feed the rest
        (at least the pending token) and return the logits after the last one."""
        pending: list[list[int]] = []
        for r in requests:
            seq = self._seq(r.seq_id)
            keep = _common_prefix(seq.fed, r.tokens[:-1])
            seq.fed = seq.fed[:keep]
            self.cache.truncate(seq.slot, keep)
            pending.append(r.tokens[keep:])
        while max(len(p) for p in pending) > self.prefill_chunk:  # long prompts: prefill in bounded chunks
            chunks = [p[:self.prefill_chunk] if len(p) > self.prefill_chunk else [] for p in pending]
            self._feed(requests, chunks, logits=False)
            pending = [p[len(c):] for p, c in zip(pending, chunks)]
        return self._feed(requests, pending)

    def _feed(self, requests: list[DraftRequest], token_lists: list[list[int]],
              logits: bool = True) -> list[torch.Tensor]:
        """One draft forward; returns, per request, the logits after its last fed token."""
        active = [(r, t) for r, t in zip(requests, token_lists) if t]
        seqs = [self.seqs[r.seq_id] for r, _ in active]
        batch = ForwardBatch.chain([s.slot for s in seqs], [t for _, t in active],
                                   [self.cache.lengths[s.slot] for s in seqs], self.model.device)
        last = torch.tensor(batch.num_rows).cumsum(0) - 1
        out = self.model.forward(batch, self.cache, logits_rows=last if logits else last[:0])
        for seq, (_, t) in zip(seqs, active):
            seq.fed += t
        return list(out.logits) if logits else []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
