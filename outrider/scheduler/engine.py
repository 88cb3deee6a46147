"""The one speculative loop: draft → verify → accept → roll back / commit both caches → emit.

Plain autoregressive decoding is the same loop with no drafter (k = 0: the target scores just the pending
token). Methods differ only in the `Drafter`, the `DraftPolicy`, where the `TargetModel` runs and the `Rounds`
order of the phases (draft then verify, or the next draft during this verify); state a method keeps per
sequence lives in its own parts, keyed by `seq_id`, never in `Sequence`.

Bookkeeping, worked through once: a sequence's committed tokens are `tokens`; the last of them is *pending*:
its K/V is not in the target cache yet, so the target cache holds len(tokens) − 1 positions. A round feeds
[pending, d1..dk] to the target (k + 1 rows, logits row i scores d_{i+1}; row k is the bonus distribution),
accepts n drafts and one extra token y, keeps the target K/V of [pending, d1..dn] and makes y the new pending
token. The drafter re-syncs itself from `tokens` at its next proposal. A tree draft is the same round: its nodes
are scored under a tree mask (node at depth d at the position of a chain's d-th draft), verification accepts a
root-to-node path, and the target cache keeps the K/V of that path (`TargetModel.compact`). A chain is the tree
whose node i is node i − 1's child.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from outrider.runtime.batch import TreeRows
from outrider.scheduler.drafters import NO_DRAFT, Draft, Drafter, DraftRequest
from outrider.scheduler.grammar import Grammar, Guide
from outrider.scheduler.policy import MAX_DRAFT, DraftPolicy, FixedK, VerifyCost
from outrider.scheduler.sampling import SamplingParams, TokenLogprob, adjust, token_logprobs, warp
from outrider.scheduler.target import PREFILL_CHUNK, TargetModel
from outrider.scheduler.verify import (
    DraftTree,
    SiblingRule,
    TreeVerifyResult,
    VerifyResult,
    rrs_without_replacement,
    verify_chain,
    verify_greedy,
    verify_tree,
    verify_tree_greedy,
)


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    stop_ids: frozenset[int] = frozenset()  # generation ends after emitting one of these (EOS); empty = ignore EOS
    # report each generated token's log-probability and this many most likely alternatives (None: none at all)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (its first has none)
    grammar: Grammar | None = None  # structured output: every generated token is one the grammar allows


@dataclass
class SpecStats:
    """Counters of one sequence. *Acceptance length* of a round = accepted drafts + 1 (the recovered or bonus
    token the target always contributes), so plain decoding has acceptance length 1."""

    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT)  # [MAX_DRAFT]
    drafted_per_position: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT)  # [MAX_DRAFT]
    # draft tokens proposed at each position, summed over rounds: a tree's nodes at each depth, a chain's one
    nodes_per_position: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT)  # [MAX_DRAFT]
    prefill_seconds: float = 0.0
    cached_prompt_tokens: int = 0  # prompt tokens whose target K/V came from the prefix cache, not a prefill
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def drafts_per_position(self) -> list[float]:
        """Mean draft tokens proposed at each position in the rounds that drafted it (a chain's: 1)."""
        return [round(n / d, 4) if d else 0.0 for n, d in zip(self.nodes_per_position, self.drafted_per_position)]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "drafts_per_position": self.drafts_per_position}

    def record(self, proposed: int, accepted: int, depth: int | None = None, widths: list[int] | None = None) -> None:
        """One round: `proposed` draft tokens (a tree's nodes) reaching `depth` positions (a chain: proposed),
        `widths[i]` of them at position i + 1 (a chain: one each)."""
        self.rounds += 1
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        for i in range(proposed if depth is None else depth):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < accepted
            self.nodes_per_position[i] += 1 if widths is None else widths[i]


@dataclass
class Sequence:
    seq_id: int
    request: Request
    slot: int
    tokens: list[int]  # prompt + generated; tokens[-1] is pending
    policy: DraftPolicy
    generator: torch.Generator
    stats: SpecStats = field(default_factory=SpecStats)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of `generated`, one each (Request.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # of the prompt, None for its first
    guide: Guide | None = None  # the grammar's state after `generated` (Request.grammar)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt_ids):]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Rounds(Protocol):
    """How one round's phases are ordered: draft then verify (`DraftThenVerify`), or a method's own order (the
    next round's draft while this round verifies). The phases themselves are the Engine's."""

    def run(self, engine: "Engine", seqs: list[Sequence], speculate: bool) -> list[list[int]]: ...

    def release(self, seq_id: int) -> None: ...  # the sequence is gone: drop what the rounds kept for it


class Engine:
    def __init__(self, target: TargetModel, drafter: Drafter | None = None,
                 policy: Callable[[], DraftPolicy] | None = None, rounds: Rounds | None = None,
                 verify_rows: int = MAX_DRAFT + 1, sibling_rule: SiblingRule = rrs_without_replacement):
        """verify_rows: the most rows one sequence adds to a target forward (a chain's k + 1, a tree's nodes + 1),
        which every request must leave room for in its context. sibling_rule: the verifier of a sampled tree's
        children, lossless for the way the drafter drew them (`scheduler.verify`)."""
        self.target = target
        self.verify_rows = verify_rows
        self.sibling_rule = sibling_rule
        self.drafter = drafter
        self.new_policy = policy or (lambda: FixedK(3 if drafter else 0))
        self.rounds = rounds or DraftThenVerify()
        self.verify_cost = VerifyCost()  # what a target forward of n rows took here, for drafters sizing trees
        self._ids = itertools.count()

    # -- lifecycle of one sequence -------------------------------------------------------------------------

    def add(self, request: Request) -> Sequence:
        """Validate, take cache slots and prefill both models with the prompt (all but its last token, which
        is pending)."""
        self.validate(request)
        seed = request.params.seed if request.params.seed is not None else torch.seed()
        seq = Sequence(next(self._ids), request, self.target.acquire(), list(request.prompt_ids),
                       self.new_policy(), torch.Generator().manual_seed(seed),
                       guide=request.grammar.start() if request.grammar is not None else None)
        t0 = time.perf_counter()
        try:
            if self.drafter is not None:  # first: a drafter in an actor prefills while the target does
                self.drafter.prefill(seq.seq_id, request.prompt_ids[:-1])
            if request.prompt_logprobs is None:
                seq.stats.cached_prompt_tokens = self.target.prefill(seq.slot, request.prompt_ids[:-1])
            else:
                seq.prompt_logprobs = self._prefill_scored(seq.slot, request)
        except BaseException:
            self.release(seq)
            raise
        seq.stats.prefill_seconds = time.perf_counter() - t0
        return seq

    def _prefill_scored(self, slot: int, request: Request) -> list[TokenLogprob | None]:
        """Prefill through the scoring forward, chunk by chunk, keeping each prompt token's log-probability (the
        kernels make the K/V exactly what a prefill writes). No penalty applies: the prompt was not sampled."""
        prompt, out = request.prompt_ids, [None]
        for i in range(0, len(prompt) - 1, PREFILL_CHUNK):
            part = prompt[i:i + PREFILL_CHUNK]
            logits = self.target.score([slot], [part[:len(prompt) - 1 - i]])[0]  # row j scores prompt[i + j + 1]
            out += token_logprobs(logits, prompt[i + 1:i + 1 + logits.shape[0]], request.params,
                                  request.prompt_logprobs)
        return out

    def release(self, seq: Sequence, reason: str = "abort") -> None:
        """Free the sequence's KV in target and drafter; idempotent."""
        if seq.slot >= 0:
            self.target.release(seq.slot)
            seq.slot = -1
            if self.drafter is not None:
                self.drafter.release(seq.seq_id)
            self.rounds.release(seq.seq_id)
        seq.finish_reason = seq.finish_reason or reason

    def stream(self, seq: Sequence) -> Iterator[list[int]]:
        """Yield the new tokens of each round until the sequence finishes; always frees its KV."""
        try:
            while not seq.finished:
                yield self.step([seq])[0]
        finally:
            self.release(seq)

    def generate(self, request: Request) -> Sequence:
        """Run one request to completion; the result carries tokens, finish reason and stats."""
        seq = self.add(request)
        for _ in self.stream(seq):
            pass
        return seq

    # -- one round for a batch of sequences ----------------------------------------------------------------

    def step(self, seqs: list[Sequence], speculate: bool = True) -> list[list[int]]:
        """One round for every sequence; speculate=False makes it a plain decode step (k = 0), except for
        seeded sampled sequences, which always draft (see `_always_drafts`)."""
        return self.rounds.run(self, seqs, speculate)

    # -- the phases a round is made of (`Rounds` orders them) ----------------------------------------------

    def draft_requests(self, seqs: list[Sequence], ks: list[int],
                       ahead: list[list[int]] | None = None) -> list[DraftRequest]:
        """What to ask the drafter: each sequence's tokens, then `ahead` (drafts proposed past them that the
        request assumes accepted, if the rounds keep any), and k."""
        ahead = ahead or [[] for _ in seqs]
        costs = self.verify_cost.table(offset=len(seqs) - 1)  # the others' pending rows at least share the forward
        # a seeded sampled request is not told the costs: a draft shaped by timing would change its tokens
        return [DraftRequest(s.seq_id, s.tokens + a, k, s.request.params, s.generator, s.slot,
                             None if s.request.params.seed is not None and not s.request.params.greedy else costs,
                             len(s.request.prompt_ids), s.guide)
                for s, k, a in zip(seqs, ks, ahead)]

    def draft_lengths(self, seqs: list[Sequence], speculate: bool, extra: int = 0) -> list[int]:
        """Tokens to draft per sequence this round: the policy's k (+ `extra`), 0 when the round does not
        draft for it, never past max_tokens."""
        if self.drafter is None:
            return [0] * len(seqs)
        return [min(s.policy.next_k() + extra, self._room(s)) if self.drafts(s, speculate) else 0 for s in seqs]

    @staticmethod
    def drafts(seq: Sequence, speculate: bool) -> bool:
        """Whether the sequence drafts in a round the gate marked `speculate`."""
        return speculate or _always_drafts(seq)

    def score(self, seqs: list[Sequence], drafts: list[Draft]) -> list[torch.Tensor]:
        """One target forward: each sequence's pending token and its drafts (a chain, or a tree's nodes)."""
        slots, rows = [s.slot for s in seqs], [[s.tokens[-1]] + d.tokens for s, d in zip(seqs, drafts)]
        if all(d.parents is None for d in drafts):
            return self.target.score(slots, rows)
        return self.target.score(slots, rows, [None if d.parents is None else TreeRows.of(d.parents) for d in drafts])

    def verify(self, seq: Sequence, drafted: list[int], probs: torch.Tensor | None,
               logits: torch.Tensor, parents: list[int] | None = None) -> VerifyResult | TreeVerifyResult:
        """Accept a prefix of `drafted` (with `parents`, a root-to-node path of the tree) against the target rows
        `logits`. A chain with as many rows as drafts (the last draft scored by the row after the others) has no
        bonus row: all accepted adds no extra."""
        logits = self.adjusted(seq, drafted, parents, logits)
        result = self._verify(seq, drafted, probs, logits, parents)
        if seq.request.logprobs is None:
            return result
        # the row that chose each committed token (a chain without a bonus row has one row fewer than tokens+1)
        rows = ([0] + [i + 1 for i in result.path])[:len(result.tokens)]
        return dataclasses.replace(result, logprobs=tuple(token_logprobs(
            logits[rows], result.tokens, seq.request.params, seq.request.logprobs)))

    @staticmethod
    def adjusted(seq: Sequence, drafted: list[int], parents: list[int] | None, logits: torch.Tensor) -> torch.Tensor:
        """The target rows after logit_bias, penalties and the grammar's mask: row i follows the committed tokens and
        the drafts on its way (a chain's first i, a tree node's ancestors and itself), as plain decoding would have
        seen them."""
        params = seq.request.params
        if not params.adjusts and seq.guide is None:
            return logits
        if parents is None:
            before = [drafted[:i] for i in range(logits.shape[0])]
        else:
            paths: list[list[int]] = []
            for node, parent in enumerate(parents):
                paths.append((paths[parent] if parent >= 0 else []) + [drafted[node]])
            before = [[]] + paths
        prompt = seq.request.prompt_ids
        logits = adjust(logits, params, prompt, seq.tokens[len(prompt):], before)
        return logits if seq.guide is None else seq.guide.constrain(logits, before)

    def _verify(self, seq: Sequence, drafted: list[int], probs: torch.Tensor | None, logits: torch.Tensor,
                parents: list[int] | None) -> VerifyResult | TreeVerifyResult:
        tokens = torch.tensor(drafted, dtype=torch.long)  # [k]
        if parents is not None:
            tree = DraftTree(tokens, torch.tensor(parents, dtype=torch.long), probs)
            if seq.request.params.greedy:
                return verify_tree_greedy(logits, tree)
            return verify_tree(warp(logits, seq.request.params), tree, seq.generator, self.sibling_rule)
        bonus = logits.shape[0] == len(drafted) + 1
        if not bonus:  # a stand-in bonus row; the token it yields is dropped below
            logits = torch.cat([logits, logits[-1:]])
        params = seq.request.params
        result = (verify_greedy(logits, tokens) if params.greedy
                  else verify_chain(warp(logits, params), tokens, probs, seq.generator))
        if not bonus and result.num_accepted == len(drafted):
            result = VerifyResult(result.num_accepted, result.tokens[:-1])
        return result

    def commit(self, seq: Sequence, scored: int, proposed: int, result: VerifyResult | TreeVerifyResult,
               draft_time: float, verify_time: float, cost: float | None = None,
               depth: int | None = None, widths: list[int] | None = None) -> list[int]:
        """Keep the target K/V of the pending token and the accepted drafts among the `scored` draft rows this
        round appended, roll back the rest, and commit the accepted tokens and the extra one. `depth`: positions a
        tree draft reached (a chain's is its length)."""
        new = self._clip(seq, result.tokens)
        base = self.target.length(seq.slot) - scored  # just past the pending token's K/V
        # the K/V of the committed tokens but the new pending one (a clipped round commits fewer than accepted)
        kept = [i for i in result.path if i < scored][:len(new) - 1]
        if kept == list(range(len(kept))):  # a chain's prefix (or a tree path down its first nodes)
            self.target.truncate(seq.slot, base + len(kept))  # roll back the target K/V of rejected drafts
        else:
            self.target.compact(seq.slot, base, kept)
        seq.tokens += new
        seq.logprobs += result.logprobs[:len(new)]
        if seq.guide is not None:
            seq.guide.commit(new)
        seq.stats.record(proposed, result.num_accepted, depth, widths)
        seq.stats.new_tokens += len(new)
        seq.stats.draft_seconds += draft_time
        seq.stats.verify_seconds += verify_time
        seq.policy.update(proposed, result.num_accepted, cost)
        return new

    def _room(self, seq: Sequence) -> int:
        """Drafting past max_tokens wastes work: at most (tokens still allowed − 1) drafts."""
        return max(0, min(MAX_DRAFT, seq.request.max_tokens - len(seq.generated) - 1))

    def _clip(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Cut at the first stop token (kept) and at max_tokens; set the finish reason."""
        for i, t in enumerate(tokens):
            if t in seq.request.stop_ids:
                seq.finish_reason = "stop"
                return tokens[:i + 1]
        room = seq.request.max_tokens - len(seq.generated)
        if len(tokens) >= room:
            seq.finish_reason = "length"
        return tokens[:room]

    def validate(self, request: Request) -> None:
        """Reject a request the engine could never finish, before it takes any resource."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        need = len(request.prompt_ids) + request.max_tokens + self.verify_rows
        if need > self.target.capacity:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) "
                             f"+ {self.verify_rows} verify rows exceeds the context limit of {self.target.capacity} "
                             "tokens; shorten the prompt or lower max_tokens")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.target.vocab_size - 1})")
        bad = [t for t, _ in request.params.logit_bias if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                             f"(0..{self.target.vocab_size - 1})")
        for name in ("logprobs", "prompt_logprobs"):
            top = getattr(request, name)
            if top is not None and not 0 <= top <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS} (alternatives per token), got {top}")


MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)


class DraftThenVerify:
    """The classic round: the drafter proposes k tokens, then one target forward scores them all."""

    def run(self, engine: Engine, seqs: list[Sequence], speculate: bool) -> list[list[int]]:
        t0 = time.perf_counter()
        ks = engine.draft_lengths(seqs, speculate)
        drafts = engine.drafter.propose(engine.draft_requests(seqs, ks)) if any(ks) else [NO_DRAFT] * len(seqs)
        draft_time = time.perf_counter() - t0 if any(ks) else 0.0
        t0 = time.perf_counter()
        logits = engine.score(seqs, drafts)
        results = [engine.verify(s, d.tokens, d.probs, rows, d.parents) for s, d, rows in zip(seqs, drafts, logits)]
        verify_time = time.perf_counter() - t0
        engine.verify_cost.observe(sum(len(rows) for rows in logits), verify_time)
        return [engine.commit(s, len(d.tokens), len(d.tokens), r, draft_time, verify_time,
                              _cost(draft_time, d.depth, verify_time), d.depth, d.widths)
                for s, d, r in zip(seqs, drafts, results)]

    def release(self, seq_id: int) -> None:
        pass  # nothing kept between rounds


def _cost(draft_time: float, drafted: int, verify_time: float) -> float | None:
    """Draft time per token relative to one verify (the adaptive policy's c)."""
    return draft_time / drafted / verify_time if drafted and verify_time > 0 else None


def _always_drafts(seq: Sequence) -> bool:
    """A seeded sampled sequence drafts in every round, whatever the speculation gate decides for the batch.
    Whether a round drafts changes which random numbers a sequence's tokens consume, and a seed promises the
    same tokens whatever else is batched alongside. Greedy output does not depend on it; an unseeded sampled
    sequence promises only the distribution, which both kinds of round give exactly."""
    params = seq.request.params
    return params.seed is not None and not params.greedy
