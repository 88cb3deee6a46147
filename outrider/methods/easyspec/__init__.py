"""EasySpec: layer-parallel drafting with an exact calibration pass each round (`drafter.py`), in this process, in
one draft actor, or with member j of every layer group in draft group actor j (`sharded.py`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from outrider.methods.base import BuildEnv, EngineParts, Method, StrategyOptions
from outrider.methods.easyspec.drafter import LayerParallel
from outrider.methods.easyspec.sharded import Sharded


class EasySpecOptions(StrategyOptions):
    name: Literal["easyspec"] = "easyspec"
    draft_group: int = Field(2, ge=1, description="draft layers run in parallel per group (1 = sequential drafting); "
                                                  "with several draft stages, their number")


class EasySpec(Method):
    name = "easyspec"
    summary = ("EasySpec: draft steps run the draft's layers in parallel groups (--draft-group), then one exact "
               "pass recalibrates the draft KV each round")
    Options = EasySpecOptions
    uses_draft_model = True
    splits_draft = True

    def check(self, options: StrategyOptions, profile: Any) -> None:
        """Several draft stages are the group actors: stage j hosts member j of every layer group."""
        assert isinstance(options, EasySpecOptions)
        draft = profile.placement.draft
        if len(draft) < 2:
            return
        staged = next((i for i, s in enumerate(draft) if s.layers is not None), None)
        if staged is not None:
            raise ValueError(f"placement.draft[{staged}].layers: easyspec's draft stage j hosts member j of every "
                             "layer group (interleaved layers, not a range); remove layers")
        if options.draft_group != len(draft):
            raise ValueError(f"strategy.draft_group: {options.draft_group}, but placement.draft has {len(draft)} "
                             f"stages, one per group member; set draft_group: {len(draft)}")
        if profile.placement.mode == "local":
            raise ValueError("placement.mode: local runs the draft in the server process, but placement.draft "
                             "has several stages (draft group actors); set mode: ray")

    def parts(self, options: StrategyOptions, env: BuildEnv) -> EngineParts:
        assert isinstance(options, EasySpecOptions)
        drafter = env.model_drafter(LayerParallel(options.draft_group), split=Sharded())
        return self.draft_then_verify(drafter, options)


METHOD = EasySpec()
