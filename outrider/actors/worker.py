"""What an actor hosts: a model (or a contiguous range of its layers) and its KV cache on one device.

These are plain classes, so tests drive them in-process; `outrider.actors.remote` wraps them in Ray actors.
Every method takes and returns only picklable plain data (token lists, numpy arrays), never torch objects that
would drag a device or a generator across processes.

Wire format of logits and hidden states: numpy arrays holding the model dtype's raw bits (bfloat16 travels as
int16, since numpy has no bfloat16). The target's logits are bf16 values upcast to fp32 (`Transformer.logits`),
so sending the bf16 bits is exact and halves the bytes: measured here 2.5 ms per 4×151,936 round trip against
4.8 ms for fp32 numpy and 12.5 ms for a pickled torch tensor.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from outrider.runtime.batch import ForwardBatch, TreeRows
from outrider.runtime.loading import load_model
from outrider.runtime.model import Transformer
from outrider.runtime.prefix_cache import HeldTokens
from outrider.scheduler.drafters import CachedSequences, Chain, DrafterFactory, DraftRequest, ReportingDrafter
from outrider.scheduler.grammar import GrammarTokenizer, Guide, RemoteGuides

PREFILL_CHUNK = 256  # rows per prefill forward: bounds activation memory; the kernels make any chunking exact
FAULT_ENV = "OUTRIDER_FAULT_INJECTION"  # "1" enables `inject_fault` (tests only; refused otherwise)


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array of its exact bits (bf16 → int16 view)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # a writable copy: Ray hands out read-only views of its object store
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


@dataclass(frozen=True)
class ModelSource:
    """How a worker loads its model: the same arguments as `load_model`, picklable."""

    model: str  # built-in name, HF folder or .gguf
    dtype: str = "bfloat16"
    weights: str = "auto"
    device: str = "cpu"
    max_positions: int | None = None
    batch_invariant: bool = True

    def load(self) -> Transformer:
        return load_model(self.model, self.dtype, self.weights, self.device, self.max_positions,
                          batch_invariant=self.batch_invariant)[0]


@dataclass
class FaultPlan:
    """Test-only fault injection: the round call after `after` more of them raises, hangs or exits the process.
    Arming it needs OUTRIDER_FAULT_INJECTION=1 in the actor's environment, so a deployment cannot be told to."""

    kind: str | None = None  # "raise" | "hang" | "exit"
    after: int = 0

    def arm(self, kind: str, after: int) -> None:
        if os.environ.get(FAULT_ENV) != "1":
            raise PermissionError(f"fault injection is disabled; it needs {FAULT_ENV}=1 (tests only)")
        if kind not in ("raise", "hang", "exit"):
            raise ValueError(f"unknown fault {kind!r}")
        self.kind, self.after = kind, after

    def tick(self) -> None:
        if self.kind is None:
            return
        if self.after > 0:
            self.after -= 1
            return
        kind, self.kind = self.kind, None
        if kind == "raise":
            raise RuntimeError("injected fault")
        if kind == "hang":
            time.sleep(3600)
        os._exit(1)


def set_threads(threads: int | None) -> None:
    """One fixed thread count per process: a kernel's reduction split follows the thread count, so a fixed count
    keeps the target's logits bitwise the same from call to call."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


class ModelWorker:
    """A model, or its layers `layers[0]..layers[1]-1`, with a KV cache of `num_slots` sequences.

    A full model scores tokens into logits. A stage of a split model takes the previous stage's hidden states
    (the first stage embeds tokens instead) and returns hidden states, or logits if it is the last stage. All
    stages of one model see the same acquire/truncate/release calls, so their caches stay in lockstep.
    """

    def __init__(self, source: ModelSource, num_slots: int, capacity: int, layers: tuple[int, int] | None = None,
                 threads: int | None = None):
        set_threads(threads)
        self.model = source.load()
        n = self.model.num_layers
        self.layers = range(*(layers or (0, n)))
        if not (0 <= self.layers.start < self.layers.stop <= n):
            raise ValueError(f"layers [{self.layers.start}, {self.layers.stop}) are outside the model's 0..{n}")
        self._drop_foreign_weights()
        self.cache = self.model.new_cache(num_slots, capacity, self.layers)
        self.held = HeldTokens(num_slots)
        self.busy_seconds = 0.0  # time spent verifying (scoring with logits): a round's wait minus this is overhead
        self.faults = FaultPlan()

    # -- what the engine's TargetModel seam needs -----------------------------------------------------------

    def info(self) -> dict:
        return {"vocab_size": self.model.config.vocab_size, "capacity": self.cache.capacity,
                "dtype": str(self.model.dtype).removeprefix("torch."), "device": str(self.model.device),
                "layers": [self.layers.start, self.layers.stop], "pid": os.getpid(),
                "kv_bytes": self.cache.nbytes, "slots_in_use": self.cache.slots_in_use,
                "busy_seconds": self.busy_seconds}

    def acquire(self) -> int:
        slot = self.cache.acquire()
        self.held.acquired(slot)
        return slot

    def release(self, slot: int) -> None:
        self.cache.release(slot)
        self.held.released(slot)

    def reset(self) -> None:
        """Drop every sequence (after a failure the caller no longer knows which slots are live) and forget what
        every slot held."""
        for slot in range(self.cache.num_slots):
            if slot not in self.cache.free_slots:
                self.cache.release(slot)
        self.held = HeldTokens(self.cache.num_slots)

    def inject_fault(self, kind: str, after: int = 0) -> None:
        self.faults.arm(kind, after)

    def truncate(self, slot: int, length: int) -> None:
        self.cache.truncate(slot, length)
        self.held.truncated(slot, length)

    def length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def reuse_prefix(self, slot: int, tokens: list[int]) -> int:
        """Copy into the new sequence's empty slot the K/V of the longest prefix of `tokens` another slot holds
        (`runtime.prefix_cache`); how many tokens. Every stage holds the same tokens, so all copy the same."""
        return self.held.reuse(self.cache, slot, tokens)[1]

    def prefill(self, slot: int, tokens: list[int], hidden: np.ndarray | None = None) -> np.ndarray | None:
        """Append tokens' K/V. A non-last stage returns the hidden states the next stage prefills from."""
        out = [self.score([slot], [tokens[i:i + PREFILL_CHUNK]],
                          None if hidden is None else hidden[i:i + PREFILL_CHUNK], logits=False)
               for i in range(0, len(tokens), PREFILL_CHUNK)]
        return None if self.is_last else np.concatenate(out) if out else None

    def score(self, slots: list[int], token_lists: list[list[int]], hidden: np.ndarray | None = None,
              logits: bool = True, trees: list[TreeRows | None] | None = None) -> np.ndarray | None:
        """Append each sequence's rows; return all rows' logits [N, vocab] (last stage) or hidden [N, hidden].

        trees: per sequence None (a chain) or its tree rows (depths and mask among the new rows)."""
        t0 = time.perf_counter()
        if logits:
            self.faults.tick()
        try:
            return self._score(self._batch(slots, token_lists, trees), hidden, logits)
        finally:
            if logits:  # prefill runs between rounds, not inside them
                self.busy_seconds += time.perf_counter() - t0

    def compact(self, slot: int, start: int, keep: list[int]) -> None:
        """Keep the accepted tree path: rows start+keep[i] move to start+i (see KVCache.compact)."""
        self.cache.compact(slot, start, keep)
        self.held.compacted(slot, start, keep)

    def _batch(self, slots: list[int], token_lists: list[list[int]],
               trees: list[TreeRows | None] | None) -> ForwardBatch:
        for b, (slot, tokens) in enumerate(zip(slots, token_lists)):
            self.held.appended(slot, tokens, tree=bool(trees and trees[b] is not None))
        return ForwardBatch.rows(slots, token_lists, [self.cache.lengths[s] for s in slots], trees, self.model.device)

    def _score(self, batch: ForwardBatch, hidden: np.ndarray | None, logits: bool) -> np.ndarray | None:
        ctx = self.model.context(batch, self.cache)
        h = self.model.embed(batch.token_ids) if self.is_first else from_wire(hidden, self.model.dtype)
        h = self.model.run_layers(h.to(self.model.device), ctx, self.layers.start, self.layers.stop)
        ctx.advance()
        if not self.is_last:
            return to_wire(h)
        # The head's output is in the model dtype; `Transformer.logits` upcasts, so casting back is exact.
        return to_wire(self.model.logits(h).to(self.model.dtype)) if logits else None

    def join_link(self, url: str) -> None:
        """Become rank 1 of a two-rank gloo group with the scheduler (see outrider.actors.transport)."""
        dist.init_process_group("gloo", init_method=url, rank=1, world_size=2)

    def score_to_link(self, slots: list[int], token_lists: list[list[int]], hidden: np.ndarray | None = None,
                      trees: list[TreeRows | None] | None = None) -> None:
        """`score`, with the logits sent to the scheduler over the gloo link instead of returned through Ray."""
        dist.send(torch.from_numpy(self.score(slots, token_lists, hidden, True, trees)), dst=0)

    def calibrate(self, slot: int, keep: int, tokens: list[int], hidden: np.ndarray | None = None):
        """Recompute K/V after position `keep` for `tokens` (roll back, then prefill them exactly)."""
        self.truncate(slot, keep)
        return self.prefill(slot, tokens, hidden)

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.stop == self.model.num_layers

    def _drop_foreign_weights(self) -> None:
        """A stage keeps only its own layers (and the embedding / head at the ends) resident."""
        w = self.model.weights
        for i in range(self.model.num_layers):
            if i not in self.layers:
                w.layers[i] = None  # type: ignore[call-overload]


class DraftWorker:
    """The drafter a `DrafterFactory` builds over the draft model, on its device (a plain chain by default). Sampled
    drafts need the sequence's random stream: the caller ships the generator state and gets the advanced state
    back, so remote drafting draws the very numbers local would."""

    def __init__(self, source: ModelSource, num_slots: int, capacity: int, threads: int | None = None,
                 factory: DrafterFactory = Chain()):
        set_threads(threads)
        self.model = source.load()
        self.factory = factory
        self.drafter: CachedSequences = factory(self.model, num_slots, capacity, None)
        self.guides = RemoteGuides(lambda: _grammar_tokenizer(source, self.model.config.vocab_size))
        self.busy_seconds = 0.0  # proposing (rounds)
        self.prefill_seconds = 0.0  # prompts, sent without waiting: a round may first wait for one to finish
        self.faults = FaultPlan()

    def info(self) -> dict:
        extra = self.drafter.report() if isinstance(self.drafter, ReportingDrafter) else {}
        return {"pid": os.getpid(), "device": str(self.model.device), "vocab_size": self.model.config.vocab_size,
                "drafter": repr(self.factory), "slots_in_use": self.drafter.slots_in_use(),
                "kv_bytes": self.drafter.cache.nbytes, "busy_seconds": self.busy_seconds,
                "prefill_seconds": self.prefill_seconds, **extra}

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        t0 = time.perf_counter()
        self.drafter.prefill(seq_id, tokens)
        self.prefill_seconds += time.perf_counter() - t0

    def propose(self, requests: list[dict]) -> list[dict]:
        """requests: {seq_id, tokens, k, params (SamplingParams), rng (generator state bytes or None)}; each reply
        also carries the call's drafting seconds (a policy may weigh them against the verify)."""
        self.faults.tick()
        t0 = time.perf_counter()
        reqs = [DraftRequest(r["seq_id"], r["tokens"], r["k"], r["params"], _generator(r["rng"]),
                             verify_seconds=r["verify_seconds"], prompt_len=r["prompt_len"], guide=self._guide(r))
                for r in requests]
        drafts = self.drafter.propose(reqs)
        seconds = time.perf_counter() - t0
        self.busy_seconds += seconds
        return [{"tokens": d.tokens, "probs": None if d.probs is None else d.probs.numpy(), "parents": d.parents,
                 "rng": None if r.generator is None else r.generator.get_state().numpy(), "seconds": seconds}
                for r, d in zip(reqs, drafts)]

    def release(self, seq_id: int) -> None:
        self.drafter.release(seq_id)
        self.guides.release(seq_id)

    def reset(self) -> None:
        self.drafter.reset()
        self.guides.guides.clear()

    def _guide(self, request: dict) -> Guide | None:
        """This actor's copy of the request's grammar state (None without a grammar)."""
        if request.get("grammar") is None:
            return None
        source, committed = request["grammar"]
        start = request["prompt_len"]
        return self.guides.sync(request["seq_id"], source, request["tokens"][start:start + committed])

    def inject_fault(self, kind: str, after: int = 0) -> None:
        self.faults.arm(kind, after)


def _grammar_tokenizer(source: ModelSource, vocab_size: int) -> GrammarTokenizer:
    from outrider.hub import resolve
    from outrider.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(resolve(source.model))
    return GrammarTokenizer(tokenizer.backend.to_str(), vocab_size, tokenizer.eos_token_ids)


def _generator(state: np.ndarray | None) -> torch.Generator | None:
    if state is None:
        return None
    g = torch.Generator()
    g.set_state(torch.from_numpy(np.array(state, dtype=np.uint8)))
    return g

