"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a draft model proposes a chain of k tokens, the
target scores them in one forward, and verification keeps the prefix the target agrees with."""
from __future__ import annotations

from typing import Literal

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions


class VanillaOptions(StrategyOptions):
    name: Literal["vanilla"] = "vanilla"


class Vanilla(Method):
    name = "vanilla"
    summary = "a draft model proposes a chain of k tokens"
    Options = VanillaOptions
    uses_draft_model = True

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        return self.draft_then_verify(env.chain_drafter(), options)


METHOD = Vanilla()
