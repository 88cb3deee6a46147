"""Decoding strategies by name: each is a drafter plus a draft-length policy; the loop is always `Engine`.

A new method registers here (or in its own module) — it never adds a branch to the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from outrider.runtime.model import Transformer
from outrider.scheduler.dovetail import DGFHead, FeatureDrafter
from outrider.scheduler.drafters import Drafter, ModelDrafter, PromptLookupDrafter
from outrider.scheduler.easyspec import LayerParallelDrafter
from outrider.scheduler.engine import DraftThenVerify, Rounds
from outrider.scheduler.pearl import Overlapped
from outrider.scheduler.policy import AdaptiveK, AutoK, DraftPolicy, FixedK


@dataclass(frozen=True)
class StrategyContext:
    draft_model: Transformer | None
    k: int  # fixed draft length (upper bound when adaptive)
    adaptive: bool
    num_slots: int
    capacity: int
    hosted_drafter: Drafter | None = None  # a model drafter already running elsewhere (an actor) to use as is
    draft_kept_ids: torch.Tensor | None = None  # [n] the draft head's tokens after VocabTrim; None = all
    draft_group: int = 2  # EasySpec: draft layers per parallel group (1 = sequential drafting)
    draft_head: DGFHead | None = None  # Dovetail: a trained DGF head bound to the target (--draft-head)
    auto_k: bool = False  # PEARL: k from the measured verify / draft-step time ratio (AutoK), k as its bound


@dataclass(frozen=True)
class Strategy:
    name: str
    needs_draft_model: bool
    lossless: bool
    make_drafter: Callable[[StrategyContext], Drafter | None]
    description: str
    rounds: Callable[[], Rounds] = DraftThenVerify  # how a round orders drafting and verifying
    uses_draft_head: bool = False  # a trained draft head (--draft-head) replaces the draft model

    def needs_draft(self, has_head: bool) -> bool:
        """Whether building this strategy needs a draft model, given whether a draft head was loaded."""
        return self.needs_draft_model and not (has_head and self.uses_draft_head)

    def build(self, ctx: StrategyContext) -> tuple[Drafter | None, Callable[[], DraftPolicy], Rounds]:
        """The Engine's parts: the drafter, a factory of per-sequence draft-length policies, the round order."""
        drafter = self.make_drafter(ctx)
        if drafter is None:
            return None, lambda: FixedK(0), self.rounds()
        if ctx.auto_k and self.rounds is Overlapped:  # only overlapped rounds time the draft against the verify
            return drafter, lambda: AutoK(k_max=max(ctx.k, 1)), self.rounds()
        if ctx.adaptive:
            return drafter, lambda: AdaptiveK(k_max=max(ctx.k, 1)), self.rounds()
        return drafter, lambda: FixedK(ctx.k), self.rounds()


def _model_drafter(ctx: StrategyContext) -> Drafter:
    if ctx.hosted_drafter is not None:
        return ctx.hosted_drafter
    assert ctx.draft_model is not None
    return ModelDrafter(ctx.draft_model, ctx.num_slots, ctx.capacity, kept_ids=ctx.draft_kept_ids)


def _easyspec_drafter(ctx: StrategyContext) -> Drafter:
    if ctx.hosted_drafter is not None:
        if getattr(ctx.hosted_drafter, "layer_group", None) is None:  # placed for another strategy
            raise ValueError("strategy 'easyspec' needs its draft actor placed for it (a profile with strategy "
                             "easyspec); --draft-actor hosts a sequential drafter: drop --draft-actor")
        return ctx.hosted_drafter
    assert ctx.draft_model is not None
    return LayerParallelDrafter(ctx.draft_model, ctx.num_slots, ctx.capacity, kept_ids=ctx.draft_kept_ids,
                                group_size=ctx.draft_group)


def _dovetail_drafter(ctx: StrategyContext) -> Drafter:
    """With a trained head, the head drafts from the target's features. Without one, Dovetail's training-free
    recipe (ALGORITHMS 4.3): the draft model drafts a plain chain of k, i.e. vanilla's drafter."""
    if ctx.draft_head is not None:
        if ctx.hosted_drafter is not None:
            raise ValueError("a Dovetail draft head runs in this process only (it reads the target's hidden states "
                             "each round); drop --draft-actor, or drop --draft-head to draft with the draft model")
        return FeatureDrafter(ctx.draft_head, ctx.num_slots, ctx.capacity)
    return _model_drafter(ctx)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("autoregressive", False, True, lambda ctx: None, "plain decoding with the target alone"),
    Strategy("vanilla", True, True, _model_drafter, "a draft model proposes a chain of k tokens"),
    Strategy("prompt-lookup", False, True, lambda ctx: PromptLookupDrafter(), "n-gram drafts from the context"),
    Strategy("pearl", True, True, _model_drafter, "PEARL: the draft model drafts the next block while the target "
             "verifies this one (pre-/post-verify; overlaps when the draft runs in its own actor)", Overlapped),
    Strategy("easyspec", True, True, _easyspec_drafter, "EasySpec: draft steps run the draft's layers in "
             "parallel groups (--draft-group), then one exact pass recalibrates the draft KV each round"),
    Strategy("dovetail", True, True, _dovetail_drafter, "Dovetail: a trained DGF head (--draft-head, from `outrider "
             "train-dgf`) drafts a chain of k from the target's hidden states; without a head the draft model "
             "drafts the chain", uses_draft_head=True),
]}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
