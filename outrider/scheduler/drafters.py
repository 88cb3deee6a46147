"""Drafters: anything that proposes the next k tokens of a sequence. The loop never asks which kind it has.

A drafter is handed the sequence's committed tokens each round (the last one is the pending token the target
has not scored yet) and syncs its own state to them; it keeps no promise from an earlier round, so rollback
after a rejection is the same code as catching up after a bonus token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch

from outrider.runtime.batch import ForwardBatch
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.model import Transformer
from outrider.runtime.prefix_cache import common_prefix, longest_prefix
from outrider.scheduler.grammar import Guide
from outrider.scheduler.policy import node_depths
from outrider.scheduler.sampling import SamplingParams, adjust, argmax, sample, warp

NO_SLOT = -1  # DraftRequest.target_slot of a request made apart from any target (benchmarks, actor checks)


@dataclass
class DraftRequest:
    seq_id: int
    tokens: list[int]  # committed tokens, prompt included (then any window drafted ahead); tokens[-1] is pending
    k: int  # tokens wanted
    params: SamplingParams
    generator: torch.Generator | None
    target_slot: int = NO_SLOT  # the sequence's slot in the target's cache (a drafter reading target features)
    # estimated seconds of the target forward verifying 1..MAX_VERIFY_ROWS rows of this sequence (None: not
    # measured yet), for a drafter sizing a tree to what verification costs here
    verify_seconds: tuple[float, ...] | None = None
    prompt_len: int = 0  # tokens[:prompt_len] is the prompt: what the penalties of `params` tell apart
    # the sequence's grammar state (a draft actor gets its source and position, and keeps its own copy)
    guide: Guide | None = None

    def adjusted(self, logits: torch.Tensor, drafted: list[int]) -> torch.Tensor:
        """[V] draft logits after the request's logit_bias, penalties and grammar mask, following `tokens` and
        `drafted`, as the target's row at that position will be (a draft that ignored them would be rejected more
        often, and a token the grammar forbids always)."""
        if not self.params.adjusts and self.guide is None:
            return logits
        prompt, rest = self.tokens[:self.prompt_len], self.tokens[self.prompt_len:]
        logits = adjust(logits[None], self.params, prompt, rest + drafted)
        if self.guide is not None:  # the guide has consumed the committed tokens; it is handed what follows them
            logits = self.guide.constrain(logits, [rest[self.guide.committed:] + drafted])
        return logits[0]


@dataclass(frozen=True)
class Draft:
    """A chain of tokens, or with `parents` a tree of them (`scheduler.verify.DraftTree` says how it verifies)."""

    tokens: list[int]  # [k'] proposed, k' <= k (a drafter may propose fewer; a tree: its nodes, at most k deep)
    probs: torch.Tensor | None  # [k', vocab] the q rows the tokens were drawn from; None = deterministic proposals
    parents: list[int] | None = None  # a tree: node i's parent node (-1: the pending token), parents first

    @property
    def depth(self) -> int:
        """Draft positions the proposal reaches: a chain's length, a tree's deepest node."""
        if self.parents is None:
            return len(self.tokens)
        return max(node_depths(self.parents), default=0)

    @property
    def widths(self) -> list[int] | None:
        """A tree's nodes at each depth (None for a chain: one per position)."""
        if self.parents is None:
            return None
        counts = [0] * self.depth
        for d in node_depths(self.parents):
            counts[d - 1] += 1
        return counts


NO_DRAFT = Draft([], None)


class Drafter(Protocol):
    def prefill(self, seq_id: int, tokens: list[int]) -> None: ...  # a new sequence's prompt (optional warm-up)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]: ...

    def release(self, seq_id: int) -> None: ...  # the sequence finished or was cancelled: free its state

    def slots_in_use(self) -> int: ...  # sequences holding KV in the drafter (0 for stateless drafters)


@runtime_checkable
class AsyncDrafter(Protocol):
    """A drafter that runs elsewhere (an actor) and can draft while the caller does other work."""

    def submit(self, requests: list[DraftRequest]) -> Callable[[], list[Draft]]:
        """Start drafting; the returned function waits for the drafts."""
        ...


@runtime_checkable
class TimedDrafter(Protocol):
    """A drafter that measures its own proposals where it runs (the caller sees only the part it waited for)."""

    last_propose_seconds: float | None  # drafting time of the latest proposal; None before the first


@runtime_checkable
class ReportingDrafter(Protocol):
    """A drafter with counters of its own (where its time went); a draft actor adds them to its `info`."""

    def report(self) -> dict: ...


class DrafterFactory(Protocol):
    """Builds a drafter over a loaded draft model, in this process or inside a draft actor: a method hands one to
    wherever its draft is placed. Factories are small frozen dataclasses (picklable, comparable), so an actor
    hosting several methods' drafters keeps one per factory."""

    def __call__(self, model: Transformer, num_slots: int, capacity: int,
                 kept_ids: torch.Tensor | None) -> Drafter: ...


class GroupDrafterFactory(Protocol):
    """Builds member `rank` of `world` of a draft split over several actors, over a loaded draft model inside its
    actor (`outrider.actors.draft_groups` runs the group)."""

    def __call__(self, model: Transformer, num_slots: int, capacity: int, rank: int,
                 world: int) -> "GroupMember": ...


class Collective(Protocol):
    """What a draft group's members exchange over torch.distributed (`outrider.actors.transport.GroupComm`)."""

    rank: int  # this member's index

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor: ...  # src's t, on every rank

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]: ...  # every rank's t, in rank order

    def broadcast_ints(self, values: list[int] | None, n: int, src: int = 0) -> list[int]: ...


class GroupMember(Protocol):
    """One member of a draft split over several actors: rank 0 drafts (a `Drafter`) and drives the others over
    `comm` inside each drafting call; the others `follow` until it says the call is over."""

    rank: int
    comm: Collective | None  # set once the members have joined their group

    def follow(self) -> int: ...  # rank > 0: run the leader's forwards for one drafting call; how many ran

    def prefill(self, seq_id: int, tokens: list[int]) -> None: ...

    def propose(self, requests: list[DraftRequest]) -> list[Draft]: ...

    def release(self, seq_id: int) -> None: ...

    def reset(self) -> None: ...

    def slots_in_use(self) -> int: ...


def start_proposals(drafter: Drafter, requests: list[DraftRequest]) -> Callable[[], list[Draft]]:
    """Start drafting and return what waits for the drafts. A drafter hosted elsewhere (`AsyncDrafter`) drafts
    meanwhile, so the caller can run the target at the same time; one in this process drafts now."""
    if isinstance(drafter, AsyncDrafter):
        return drafter.submit(requests)
    drafts = drafter.propose(requests)
    return lambda: drafts


def check_vocabularies(target_vocab: int, draft_vocab: int, target: str, draft: str) -> None:
    """A draft proposes token ids the target scores: both must use the same vocabulary."""
    if draft_vocab != target_vocab:
        raise ValueError(f"draft {draft} has a vocabulary of {draft_vocab} tokens but the target {target} has "
                         f"{target_vocab}; a draft must share the target's tokenizer")


@dataclass
class DraftSeq:
    slot: int
    fed: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds, in order
    former: list[int] = field(default_factory=list)  # what the slot held for an earlier sequence, until reused


class CachedSequences:
    """A drafter's sequences over its one KV cache: a slot each, taken on first sight, freed on release. A freed
    slot's tokens are remembered until it is taken again, so a new sequence can start from a prefix that any slot
    holds (`reuse_prefix`)."""

    cache: KVCache
    seqs: dict[int, DraftSeq]
    retained: dict[int, list[int]]  # free slot -> the tokens its K/V still holds

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.cache.release(seq.slot)
            self.retained[seq.slot] = seq.fed

    def reuse_prefix(self, seq: DraftSeq, tokens: list[int]) -> int:
        """Give the new sequence's empty slot the K/V of the longest prefix of `tokens` another slot holds, or its
        own slot held before it was taken again (see `runtime.prefix_cache`); how many tokens that covers."""
        held = {s.slot: s.fed for s in self.seqs.values() if s is not seq} | self.retained | {seq.slot: seq.former}
        seq.former = []
        source, n = longest_prefix(tokens, held)
        if source is not None:
            self.cache.copy_prefix(source, seq.slot, n)
            seq.fed = tokens[:n]
        return n

    def reset(self) -> None:
        """Drop every sequence (after a failure its owner no longer knows which are live)."""
        for seq_id in list(self.seqs):
            self.release(seq_id)

    def slots_in_use(self) -> int:
        return self.cache.slots_in_use

    def _seq(self, seq_id: int) -> DraftSeq:
        if seq_id not in self.seqs:
            slot = self.cache.acquire()
            self.seqs[seq_id] = DraftSeq(slot, former=self.retained.pop(slot, []))
        return self.seqs[seq_id]


@dataclass(frozen=True)
class Chain:
    """The `DrafterFactory` of `ModelDrafter`: the draft model proposes a plain chain of k tokens."""

    def __call__(self, model: Transformer, num_slots: int, capacity: int,
                 kept_ids: torch.Tensor | None) -> "ModelDrafter":
        return ModelDrafter(model, num_slots, capacity, kept_ids=kept_ids)


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
        self.retained: dict[int, list[int]] = {}

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        """Feed the prompt when the sequence starts, so the first round drafts at once; a prefix another slot
        holds is copied, not recomputed."""
        seq = self._seq(seq_id)
        done = self.reuse_prefix(seq, tokens) if not seq.fed else 0
        self.model.prefill(self.cache, seq.slot, tokens[done:], self.prefill_chunk)
        seq.fed += tokens[done:]

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
                    # a trimmed head's columns are not token ids: it drafts unadjusted, still exact (q is what it drew)
                    row = r.adjusted(row, tokens[r.seq_id]) if self.kept_ids is None else row
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
            keep = common_prefix(seq.fed, r.tokens[:-1])
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
        last = batch.last_rows()
        out = self.model.forward(batch, self.cache, logits_rows=last if logits else last[:0])
        for seq, (_, t) in zip(seqs, active):
            seq.fed += t
        return list(out.logits) if logits else []



