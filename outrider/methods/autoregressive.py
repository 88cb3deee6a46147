"""Plain decoding with the target alone: the loop with no drafter, one token per round (the baseline)."""
from __future__ import annotations

from typing import Literal

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions


class AutoregressiveOptions(StrategyOptions):
    name: Literal["autoregressive"] = "autoregressive"


class Autoregressive(Method):
    name = "autoregressive"
    summary = "plain decoding with the target alone"
    Options = AutoregressiveOptions

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        return self.draft_then_verify(None, options)


METHOD = Autoregressive()
