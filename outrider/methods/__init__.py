"""The registry of decoding methods: one line per method (its module under `outrider.methods`, which defines
`METHOD`). Everything that lists strategies — the CLI's choices and flags, the profile schema, `outrider bench
--strategies`, `/v1/models` — reads this, so a method added here appears everywhere at once."""
from __future__ import annotations

import importlib

from outrider.methods.base import Method, StrategyOptions

_MODULES = (
    "autoregressive",
    "vanilla",
    "tree",
    "multi_draft",
    "prompt_lookup",
    "suffix",
    "rasd",
    "pearl",
    "easyspec",
    "dovetail",
)

METHODS: dict[str, Method] = {m.name: m for m in (importlib.import_module(f"{__name__}.{mod}").METHOD
                                                 for mod in _MODULES)}
BASELINE = METHODS["autoregressive"].name  # what `outrider bench` always runs and measures the others against
DEFAULT = "vanilla"  # the strategy a profile or `generate` runs when none is named


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def options_types() -> tuple[type[StrategyOptions], ...]:
    """Every method's options class, in registry order (the members of the profile's `strategy` union)."""
    return tuple(m.Options for m in METHODS.values())
