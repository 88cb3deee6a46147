"""Dovetail: a trained gated-fusion draft head over the target's hidden states (`head.py`, trained by `outrider
train-dgf`, `train.py`) drafts a chain of k. Without a head, Dovetail's training-free recipe: the draft model drafts
the plain chain (vanilla's drafter), placed wherever the profile puts the draft — on a GPU beside a CPU target, the
split Dovetail is named for."""
from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.methods.dovetail.head import FeatureDrafter, load_head
from outrider.methods.dovetail.train import register_cli


class DovetailOptions(StrategyOptions):
    name: Literal["dovetail"] = "dovetail"
    draft_head: str | None = Field(None, description="a DGF draft head from `outrider train-dgf` (drafts from the "
                                                     "target's hidden states; no draft model is loaded for it)")


class Dovetail(Method):
    name = "dovetail"
    summary = ("Dovetail: a trained DGF head (--draft-head, from `outrider train-dgf`) drafts a chain of k from the "
               "target's hidden states; without a head the draft model drafts the chain")
    Options = DovetailOptions

    def drafts_with_model(self, options: StrategyOptions) -> bool:
        assert isinstance(options, DovetailOptions)
        return options.draft_head is None

    def needs_target_features(self, options: StrategyOptions) -> bool:
        assert isinstance(options, DovetailOptions)
        return options.draft_head is not None

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, DovetailOptions)
        if options.draft_head is None:
            return self.draft_then_verify(env.chain_drafter(), options)
        head = load_head(options.draft_head, env.target_model())
        features = env.target_features()
        return self.draft_then_verify(FeatureDrafter(head, features, env.num_slots, env.capacity), options)

    def commands(self, sub: argparse._SubParsersAction) -> None:
        register_cli(sub)


METHOD = Dovetail()
