"""The plug-in seam: what a decoding method declares, and what the builder hands it to assemble its engine parts.

A method is one module (or folder) under `outrider.methods` holding a `Method` subclass and its `StrategyOptions`
subclass, plus one line in the registry (`outrider.methods.METHODS`). From that declaration come the CLI flags
(`outrider.flags`), the profile's `strategy` section (a union over every method's options, tagged by `name`), the
choices of `outrider bench --strategies`, and the engine the builder (`outrider.build`) assembles for `generate`,
`bench`, `serve`, `batch` and the draft actors. The loop (`outrider.scheduler.engine`) never learns a name.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import Drafter, DrafterFactory, GroupDrafterFactory
from outrider.scheduler.engine import DraftThenVerify, Rounds
from outrider.scheduler.policy import MAX_DRAFT, MAX_VERIFY_ROWS, AdaptiveK, DraftPolicy, FixedK
from outrider.scheduler.target import FeatureSource
from outrider.scheduler.verify import SiblingRule, rrs_without_replacement


class StrategyOptions(BaseModel):
    """Options every strategy takes. A method's own options subclass this, with `name: Literal["its-name"]` (the
    tag of the profile's `strategy` union) and its fields, each with a default, bounds and a description (the
    CLI's help text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # A policy beyond fixed and adaptive that a method adds to its `policy` literal: name -> (what it does, what
    # it takes), for the message a strategy without it gives
    extra_policies: ClassVar[dict[str, tuple[str, str]]] = {}

    name: str
    k: int = Field(3, ge=1, le=MAX_DRAFT, description="draft tokens per round (the upper bound when adaptive or "
                                                       "auto)")
    policy: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: k every round; adaptive: k per round from measured acceptance and draft cost")

    @model_validator(mode="before")
    @classmethod
    def _policy_offered(cls, data: Any) -> Any:
        """A policy another strategy adds (such as auto) gets a message saying which strategy offers it, not a
        bare literal error."""
        policy = data.get("policy") if isinstance(data, dict) else None
        offered = [c for c in _option_classes() if policy in c.policies()]
        if isinstance(policy, str) and policy not in cls.policies() and offered:
            what, needs = offered[0].extra_policies[policy]
            raise ValueError(f"strategy.policy: {policy} {what}, which only {' and '.join(c.tag() for c in offered)} "
                             f"{needs} (strategy.name is {cls.tag()!r}); use policy: {' or '.join(cls.policies())}, "
                             f"or strategy.name: {offered[0].tag()}")
        return data

    @classmethod
    def tag(cls) -> str:
        """The strategy name this options class belongs to (the default of its `name` literal)."""
        return cls.model_fields["name"].default

    @classmethod
    def policies(cls) -> tuple[str, ...]:
        return cls.model_fields["policy"].annotation.__args__

    @classmethod
    def own_fields(cls) -> dict[str, Any]:
        """The method's fields beyond the common ones (name, k, policy)."""
        return {n: f for n, f in cls.model_fields.items() if n not in StrategyOptions.model_fields}


def _option_classes() -> list[type[StrategyOptions]]:
    """Every method's options class (the subclasses that carry a name literal), in definition order."""
    found, stack = [], list(StrategyOptions.__subclasses__())
    while stack:
        c = stack.pop(0)
        stack += c.__subclasses__()
        if c.model_fields["name"].default is not None and c.model_fields["name"].annotation is not str:
            found.append(c)
    return found


@dataclass(frozen=True)
class EngineParts:
    """What a method contributes to the one loop: `Engine(target, drafter, policy, rounds)`."""

    drafter: Drafter | None
    policy: Callable[[], DraftPolicy]  # a fresh draft-length policy per sequence
    rounds: Rounds
    verify_rows: int = MAX_DRAFT + 1  # the most rows a sequence adds to one target forward
    sibling_rule: SiblingRule = rrs_without_replacement  # how a sampled tree's children verify: how they were drawn


class BuildEnv(Protocol):
    """What the builder offers a method assembling its parts. Each call answers wherever the profile placed the
    models: in this process, in a draft actor, as CUDA-graph replays, across draft group actors."""

    num_slots: int  # sequences decoded together
    capacity: int  # KV positions per sequence

    def chain_drafter(self) -> Drafter:
        """The draft model proposing a plain chain of k tokens (`scheduler.drafters.ModelDrafter` or an equivalent:
        a graph replay per round with graphs on, the same drafter in the draft actor)."""
        ...

    def model_drafter(self, factory: DrafterFactory, split: GroupDrafterFactory | None = None) -> Drafter:
        """The draft model drafting with `factory`, in this process or inside the draft actor; where the profile
        splits the draft over several stages, `split` builds each stage's member (a method that cannot split
        passes None, and such a profile is refused)."""
        ...

    def target_model(self) -> Transformer:
        """The target's weights in this process (a draft head binds to them); ValueError where it runs elsewhere."""
        ...

    def target_features(self) -> FeatureSource:
        """The target recording its last layer's hidden states for a drafter that reads them; ValueError where the
        target cannot (it runs in actors, or as graph replays)."""
        ...


class Method:
    """A decoding method. Subclasses set the class attributes and override what they change."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help, the strategies table and /v1/models
    Options: ClassVar[type[StrategyOptions]]
    lossless: ClassVar[bool] = True  # output is exactly the target's (greedy: token for token)
    splits_draft: ClassVar[bool] = False  # passes `split` to `model_drafter`: several draft stages are its groups
    drafts_trees: ClassVar[bool] = False  # proposes trees (`Draft.parents`), which graph steps cannot score
    uses_draft_model: ClassVar[bool] = False  # drafts with the draft model whatever its options

    def drafts_with_model(self, options: StrategyOptions) -> bool:
        """Whether these options draft with the draft model (a profile then needs `models.draft`); a method whose
        options decide it overrides this."""
        return self.uses_draft_model

    def needs_target_features(self, options: StrategyOptions) -> bool:
        """Whether its drafter reads the target's hidden states (the target must then run in this process)."""
        return False

    def check(self, options: StrategyOptions, profile: Any) -> None:
        """Refuse a profile (an `outrider.profile.Profile`, whose schema is built from the methods, so it is not
        imported here) these options cannot run with: ValueError `field: problem; fix`. The common checks (a draft
        model present, several draft stages, target features) run before, from the declarations."""

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        raise NotImplementedError

    def commands(self, sub: argparse._SubParsersAction) -> None:
        """Add the `outrider` subcommands the method brings (a training command), if any."""

    def policy(self, options: StrategyOptions) -> Callable[[], DraftPolicy]:
        """Per-sequence draft-length policies for `options.policy` (a method with a policy of its own extends it)."""
        k = options.k
        if options.policy == "adaptive":
            return lambda: AdaptiveK(k_max=k)
        return lambda: FixedK(k)

    def draft_then_verify(self, drafter: Drafter | None, options: StrategyOptions) -> EngineParts:
        """The classic round over `drafter` with the options' policy (most methods differ only in the drafter)."""
        if drafter is None:
            return EngineParts(None, lambda: FixedK(0), DraftThenVerify())
        rows = MAX_VERIFY_ROWS if self.drafts_trees else MAX_DRAFT + 1
        return EngineParts(drafter, self.policy(options), DraftThenVerify(), rows)
