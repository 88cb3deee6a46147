"""The engine's seams (`TargetModel`, `Drafter`) over Ray actors: the loop runs unchanged whether its models are
in this process or on placed devices.

Per round the target costs one blocking call (score). Everything else is sent without waiting: Ray runs one
caller's calls on an actor in submission order, so a truncate or release sent now is applied before the next
score, and the cache lengths are mirrored here instead of asked for.

Faults. Ray restarts a crashed actor (`max_restarts` in the profile; it reloads its model) but runs each call at
most once: a call in flight when the actor died fails, and a retry could emit tokens twice. So after any failed
call the caches are taken as lost: every actor of the role is told to drop its state, and the role is
*recovering* until a probe call answers. A lost target ends the requests it was serving (the scheduler sends
them an error) and takes new ones once recovered; a lost drafter only pauses speculation: rounds verify no
drafts, which is plain decoding of the same target, so the output does not change, and drafting resumes once
the restarted draft catches up from the committed tokens it is handed. A call not answered within the
watchdog's timeout counts as hung: the actor is killed so that Ray restarts it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from outrider.actors.transport import GlooLink
from outrider.actors.worker import from_wire
from outrider.runtime.batch import TreeRows
from outrider.runtime.loading import parse_dtype
from outrider.scheduler.drafters import NO_DRAFT, Draft, DraftRequest

log = logging.getLogger(__name__)


LOST = (RayActorError, GetTimeoutError)  # the actor is gone or hung, as opposed to a call that raised


class TargetLost(RuntimeError):
    """The target's actors failed mid-request; their caches are gone (the actors restart)."""


@dataclass
class Recovery:
    """One role's actors through a failure and Ray's restart of them."""

    actors: list
    timeout_s: float | None = None  # the watchdog: a call unanswered by then is hung
    probe: list | None = None  # info() calls sent after a failure; recovered when they all answer
    dead: str | None = None  # why the role cannot come back (Ray ran out of restarts)
    failures: int = 0
    last_error: str | None = None

    def get(self, ref):
        """ray.get under the watchdog. A lost actor (dead, restarting or hung) starts recovery; an exception
        raised by the call itself (the actor is fine) is only re-raised."""
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except LOST as e:
            self.failed(e)
            raise

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        self.last_error = _describe(error)
        log.warning("actor call failed (%s); recovering", self.last_error)
        if isinstance(error, GetTimeoutError):
            for a in self.actors:  # hung: kill it; Ray restarts it (and counts the restart)
                ray.kill(a, no_restart=False)
        for a in self.actors:  # a live actor drops every sequence; a restarted one has none
            a.reset.remote()
        self.probe = [a.info.remote() for a in self.actors]

    def ready(self) -> bool:
        """Whether the actors answer again; never blocks."""
        if self.probe is None:
            return self.dead is None
        done, _ = ray.wait(self.probe, num_returns=len(self.probe), timeout=0)
        if len(done) < len(self.probe):
            return False
        try:
            ray.get(self.probe)
        except ActorDiedError as e:  # out of restarts: it will not come back
            self.dead, self.probe = _describe(e), None
            return False
        except RayActorError:  # still restarting: ask again
            self.probe = [a.info.remote() for a in self.actors]
            return False
        self.probe = None
        log.warning("actors recovered after %d failure(s)", self.failures)
        return True

    @property
    def state(self) -> str:
        """ok | recovering | dead (for /health)."""
        return "ok" if self.ready() else "dead" if self.dead else "recovering"


def _describe(error: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


class ActorTarget:
    """A target model hosted by one actor, or split by layers over several stage actors (a pipeline: each stage
    passes its hidden states to the next as a Ray object reference, without coming back here)."""

    def __init__(self, stages: list, timeout_s: float | None = None):
        """The stages may still be loading; `wait` for them before the first call."""
        self.stages = stages
        self.recovery = Recovery(stages, timeout_s)
        self.lengths: dict[int, int] = {}  # slot -> positions held, mirrored from the calls we sent
        self.link = None  # a GlooLink to the last stage when the transport is gloo
        self.loaded = False
        self._infos = [s.info.remote() for s in stages]

    def wait(self, gloo: bool = False) -> None:
        """Block until every stage has loaded its model (a load error raises here); then, with `gloo`, bring the
        logits over a torch.distributed link instead of Ray's object store. Once."""
        if self.loaded:
            return
        infos = ray.get(self._infos)
        self.vocab_size = infos[-1]["vocab_size"]
        self.capacity = min(i["capacity"] for i in infos)
        self.dtype = parse_dtype(infos[-1]["dtype"])
        if gloo:
            self.link = GlooLink(self.stages[-1], self.vocab_size, self.dtype)
        self.loaded = True

    def acquire(self) -> int:
        self._check([])
        slots = self._get([s.acquire.remote() for s in self.stages])
        assert len(set(slots)) == 1, f"stage caches out of step: slots {slots}"
        self.lengths[slots[0]] = 0
        return slots[0]

    def release(self, slot: int) -> None:
        if self.lengths.pop(slot, None) is None:
            return  # lost in a failure: the actors already dropped it, and may have handed the slot out again
        for s in self.stages:
            s.release.remote(slot)

    def prefill(self, slot: int, tokens: list[int]) -> int:
        self._check([slot])
        reused = self._get([s.reuse_prefix.remote(slot, tokens) for s in self.stages]) if tokens else [0]
        assert len(set(reused)) == 1, f"stage caches out of step: prefixes {reused}"
        rest = tokens[reused[0]:]
        if rest:
            self._get(self._chain("prefill", slot, rest))  # blocking: a too-long prompt must fail here
        self.lengths[slot] += len(tokens)
        return reused[0]

    def score(self, slots: list[int], token_lists: list[list[int]],
              trees: list[TreeRows | None] | None = None) -> list[torch.Tensor]:
        """Chains, or with `trees` each sequence's rows as a draft tree (see TreeRows)."""
        self._check(slots)
        if self.link is not None:
            try:
                hidden = self._chain("score", slots, token_lists, stages=self.stages[:-1], trees=trees)
                logits = self.link.score(slots, token_lists, hidden, trees).view(self.dtype).float()
            except BaseException as e:
                self.link = None  # the link closed itself; later rounds go through Ray
                self._lost(e)  # which stage broke it is unknown: treat every stage's cache as lost
                if isinstance(e, LOST):
                    raise TargetLost(f"the target failed mid-request: {self.recovery.last_error}") from e
                raise
        else:
            logits = from_wire(self._get(self._chain("score", slots, token_lists, trees=trees)), self.dtype).float()
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
        return [i["slots_in_use"] for i in self.infos()]

    def infos(self) -> list[dict]:
        """Each stage's `info` (its counters: busy seconds, KV bytes, slots in use)."""
        return ray.get([s.info.remote() for s in self.stages])

    def _get(self, ref):
        try:
            return self.recovery.get(ref)
        except LOST as e:
            self._lost(e)
            raise TargetLost(f"the target failed mid-request: {self.recovery.last_error}") from e

    def _lost(self, error: BaseException) -> None:
        """Every sequence's KV is gone with the failure; their slots are forgotten so no stale call (a release,
        a score) can ever reach a slot the restarted actors hand to a new request."""
        if self.recovery.probe is None:  # the link path fails before recovery saw the error
            self.recovery.failed(error)
        self.lengths.clear()

    def _check(self, slots: list[int]) -> None:
        """Refuse work while recovering, and for sequences whose KV was lost."""
        if not self.recovery.ready():
            state = "cannot restart" if self.recovery.dead else "is restarting"
            raise TargetLost(f"the target model {state} after a failure ({self.recovery.last_error})")
        if any(s not in self.lengths for s in slots):
            raise TargetLost("the target model failed and restarted; this request's KV cache was lost")

    def _chain(self, method: str, *args, stages: list | None = None, **kwargs) -> ray.ObjectRef | None:
        """Call `method` on each stage in order, handing each the previous stage's hidden states (a reference:
        Ray moves them stage to stage without passing through here)."""
        ref = None
        for s in self.stages if stages is None else stages:
            ref = getattr(s, method).remote(*args, hidden=ref, **kwargs)
        return ref


class ActorDrafter:
    """The drafter a `DraftWorker` actor hosts, as the engine's `Drafter` (an `AsyncDrafter` and a `TimedDrafter`:
    it drafts while the caller verifies, and reports how long the actor drafted). Sampling draws from the
    sequence's own generator: its state goes with the request and comes back advanced, so the draws equal an
    in-process drafter's."""

    def __init__(self, actor, overlap_prefill: bool = True, timeout_s: float | None = None):
        self.actor = actor
        self.overlap_prefill = overlap_prefill
        self.recovery = Recovery([actor], timeout_s)
        self.last_propose_seconds: float | None = None  # the last proposal's drafting time, measured in the actor

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        """The engine prefills the drafter first, then the target. On its own device the draft's prefill runs
        while the target's does (nothing to wait for: it is ordered before the first propose). Sharing the
        target's cores, overlapping only slows the target's prefill, which decides the time to first token
        (measured on 2 cores: 1.89 s against 1.38 s), so then it waits."""
        if not self.recovery.ready():
            return  # the restarted draft catches up from the committed tokens at its first proposal
        refs = self._send("prefill", seq_id, tokens)
        if not self.overlap_prefill:
            try:
                self.recovery.get(refs)
            except Exception as e:  # noqa: BLE001 — a lost draft never fails a request
                if self.recovery.probe is None:
                    self.recovery.failed(e)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return self.submit(requests)()

    def submit(self, requests: list[DraftRequest]) -> Callable[[], list[Draft]]:
        """Send the proposal call and return what waits for it: the actor drafts while the caller goes on (the
        target verifying, in overlapped rounds). A lost draft gives empty drafts, which is lossless: the
        sequences' generators advance only when a reply arrives."""
        none = [NO_DRAFT] * len(requests)
        if not self.recovery.ready():
            return lambda: none  # plain decoding until the draft is back
        wire = [{"seq_id": r.seq_id, "tokens": r.tokens, "k": r.k, "params": r.params,
                 "verify_seconds": r.verify_seconds, "prompt_len": r.prompt_len,
                 # the grammar travels as its source and the guide's position; the actor keeps its own copy
                 "grammar": None if r.guide is None else (r.guide.grammar.source, r.guide.committed),
                 "rng": None if r.generator is None else r.generator.get_state().numpy()} for r in requests]
        refs = self._send("propose", wire)

        def collect() -> list[Draft]:
            try:
                replies = self.recovery.get(refs)[0]
            except Exception as e:  # noqa: BLE001
                if self.recovery.probe is None:  # the call raised: the draft's state may be half-updated
                    self.recovery.failed(e)
                return none
            if replies:
                self.last_propose_seconds = replies[0]["seconds"]
            return [self._unpack(r, reply) for r, reply in zip(requests, replies)]

        return collect

    def _send(self, method: str, *args) -> list:
        """Call `method` on the draft actor; the first reference is its reply (a group drafter adds the calls
        its other actors take part with: `outrider.actors.draft_groups.ActorGroupDrafter`)."""
        return [getattr(self.actor, method).remote(*args)]

    @staticmethod
    def _unpack(request: DraftRequest, reply: dict) -> Draft:
        if reply["rng"] is not None:
            request.generator.set_state(torch.from_numpy(np.array(reply["rng"], dtype=np.uint8)))
        probs = None if reply["probs"] is None else torch.from_numpy(np.array(reply["probs"]))
        return Draft(reply["tokens"], probs, reply["parents"])

    def release(self, seq_id: int) -> None:
        self.actor.release.remote(seq_id)

    def slots_in_use(self) -> int:
        if not self.recovery.ready():
            return 0  # a restarting actor holds nothing
        return self.info()["slots_in_use"]

    def info(self) -> dict:
        """The draft actor's `info` (blocks until it has loaded its model: a load error raises here)."""
        return ray.get(self.actor.info.remote())
