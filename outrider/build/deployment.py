"""The builder: a validated profile — read from YAML, or made from CLI flags (`outrider.flags`) — becomes models
loaded where it places them (`Deployment.start`), and engines over them for any registered strategy
(`Deployment.engine`). `generate`, `bench` (`outrider.pipeline`), `serve` and `batch` (`outrider.service`) all
start one; the draft actors run the drafter the strategy's factory builds.

Where things run, by `placement.mode`:
- local: target and draft in this process (every engine gets its own KV cache over the shared weights);
- hybrid: the target in this process, the draft in Ray actors (one per drafter kind, or a draft group);
- ray: the target's stages and the draft in Ray actors; the engine here only schedules and verifies.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from outrider.build.hosts import DraftHost, LocalDraft
from outrider.hub import resolve
from outrider.methods import get_method
from outrider.methods.base import BuildEnv, StrategyOptions
from outrider.profile import Profile, Stage, check_strategy
from outrider.runtime.checkpoint import load_checkpoint
from outrider.runtime.loading import load_model
from outrider.runtime.model import Transformer
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.drafters import Chain, Drafter, DrafterFactory, GroupDrafterFactory, check_vocabularies
from outrider.scheduler.engine import Engine
from outrider.scheduler.graphed import GraphTarget
from outrider.scheduler.target import FeatureSource, LocalTarget, TargetModel, features_of
from outrider.scheduler.vocab_trim import TrimmedVocab, trim_head

if TYPE_CHECKING:  # Ray is imported only where actors run
    from outrider.actors.remote import ActorTarget

log = logging.getLogger(__name__)
THREADS = 2  # torch threads of an in-process target when its stage names none: one count for every call


@dataclass
class Deployment:
    """A profile's models, loaded and placed; engines are built over them per strategy."""

    profile: Profile
    tokenizer: Tokenizer
    target_model: Transformer | None  # the target's weights in this process (local, hybrid)
    remote_target: ActorTarget | None  # the target's actors (ray)
    draft: DraftHost | None
    load_seconds: float
    placed: list = field(default_factory=list)  # every placement (outrider.actors.placement.Placed), to shut down

    @classmethod
    def start(cls, profile: Profile, strategies: list[StrategyOptions] | None = None) -> "Deployment":
        """Load and place what `strategies` (default: the profile's) need, blocking until the models are up. Each
        strategy is checked against the profile first, so a bad combination fails before anything loads."""
        strategies = strategies or [profile.strategy]
        for options in strategies:
            check_strategy(profile, options)
        needs_draft = any(get_method(o.name).drafts_with_model(o) for o in strategies)
        t0 = time.perf_counter()
        tokenizer = Tokenizer.load(load_checkpoint(resolve(profile.models.target.model)).tokenizer_source)
        if profile.placement.mode == "ray":
            from outrider.build.actors import start_remote  # Ray is imported only where actors run

            remote, draft, placed = start_remote(profile, needs_draft)
            return cls(profile, tokenizer, None, remote, draft, time.perf_counter() - t0, placed)
        stage = profile.placement.target[0]
        torch.set_num_threads(stage.threads or THREADS)
        t = profile.models.target
        target, _ = load_model(t.model, t.dtype, t.weights, _local_device(stage), profile.scheduler.max_seq_len)
        deployment = cls(profile, tokenizer, target, None, None, 0.0)
        if needs_draft:
            deployment.draft = _draft_host(profile, target.config.vocab_size, deployment.placed)
        deployment.load_seconds = time.perf_counter() - t0
        return deployment

    def engine(self, options: StrategyOptions | None = None) -> Engine:
        """A new engine for `options` (default: the profile's strategy) over the loaded models."""
        options = options or self.profile.strategy
        check_strategy(self.profile, options)
        limits = self.profile.scheduler
        env = Env(self._target(), self.target_model, self.draft, limits.max_running, limits.max_seq_len)
        try:
            parts = get_method(options.name).parts(options, env)
            if self.placed or self.remote_target is not None:  # actors load in the background until here
                from outrider.build.actors import wait_remote

                wait_remote(self.profile, self.remote_target, self.draft)
        except BaseException:
            self.shutdown()
            raise
        return Engine(env.target, parts.drafter, parts.policy, parts.rounds, parts.verify_rows, parts.sibling_rule)

    def remote_parts(self, engine: Engine) -> tuple["ActorTarget | None", Drafter | None]:
        """Which of `engine`'s target and drafter run in Ray actors (None for a part in this process)."""
        drafter = engine.drafter if self.draft is not None and not isinstance(self.draft, LocalDraft) else None
        return self.remote_target, drafter

    def _target(self) -> TargetModel:
        if self.remote_target is not None:
            return self.remote_target
        assert self.target_model is not None
        limits = self.profile.scheduler
        if self.profile.placement.graphs:
            return GraphTarget(self.target_model, limits.max_running, limits.max_seq_len)
        return LocalTarget(self.target_model, limits.max_running, limits.max_seq_len)

    def shutdown(self) -> None:
        """Stop every actor placed for this deployment (idempotent)."""
        if self.remote_target is not None and self.remote_target.link is not None:
            self.remote_target.link.close()
        for p in self.placed:
            p.shutdown()
        self.placed.clear()


@dataclass
class Env(BuildEnv):
    """The `BuildEnv` of one engine."""

    target: TargetModel
    local_target: Transformer | None
    draft: DraftHost | None
    num_slots: int
    capacity: int

    def chain_drafter(self) -> Drafter:
        return self.model_drafter(Chain())

    def model_drafter(self, factory: DrafterFactory, split: GroupDrafterFactory | None = None) -> Drafter:
        if self.draft is None:
            raise ValueError("this strategy drafts with a draft model, but none was loaded; give one (--draft, or "
                             "models.draft in the profile)")
        return self.draft.drafter(factory, split)

    def target_model(self) -> Transformer:
        if self.local_target is None:
            raise ValueError("this strategy binds to the target's weights, which run in Ray actors here; set "
                             "placement.mode: local")
        return self.local_target

    def target_features(self) -> FeatureSource:
        return features_of(self.target)


def _local_device(stage: Stage) -> str:
    if stage.device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return stage.device


def _draft_host(profile: Profile, target_vocab: int, placed: list) -> DraftHost:
    """The draft in this process (local) or in actors placed on demand (hybrid)."""
    d, limits = profile.models.draft, profile.scheduler
    assert d is not None
    if profile.placement.mode == "hybrid":
        from outrider.build.actors import hybrid_draft  # Ray is imported only where actors run

        return hybrid_draft(profile, target_vocab, placed)
    model, _ = load_model(d.model, d.dtype, d.weights, _local_device(profile.placement.draft[0]), limits.max_seq_len,
                          batch_invariant=False)
    check_vocabularies(target_vocab, model.config.vocab_size, profile.models.target.model, d.model)
    kept = None
    if d.vocab:
        vocab = TrimmedVocab.load(d.vocab)
        trim_head(model, vocab)
        kept = vocab.ids
    return LocalDraft(model, limits.max_running, limits.max_seq_len, kept, profile.placement.graphs)
