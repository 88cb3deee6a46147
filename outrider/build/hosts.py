"""Where the draft model runs, as the builder sees it: a `DraftHost` builds a method's drafter there."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import Chain, Drafter, DrafterFactory, GroupDrafterFactory
from outrider.scheduler.graphed import GraphDrafter


class DraftHost(Protocol):
    def drafter(self, factory: DrafterFactory, split: GroupDrafterFactory | None) -> Drafter:
        """The drafter `factory` builds (or, over a draft split into several stages, `split`'s group)."""
        ...


@dataclass
class LocalDraft:
    """The draft model in this process; every engine gets its own drafter (its own KV cache)."""

    model: Transformer
    num_slots: int
    capacity: int
    kept_ids: torch.Tensor | None = None  # [n] the head's tokens after VocabTrim
    graphs: bool = False  # greedy chain drafts as one static-shape replay per round

    def drafter(self, factory: DrafterFactory, split: GroupDrafterFactory | None) -> Drafter:
        if self.graphs and factory == Chain():
            return GraphDrafter(self.model, self.num_slots, self.capacity)
        return factory(self.model, self.num_slots, self.capacity, self.kept_ids)


