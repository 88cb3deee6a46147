"""What one forward takes: the new rows of one or more sequences, each with its cache slot and RoPE positions."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    """New rows of B sequences, concatenated sequence after sequence (N = sum(num_rows))."""

    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64 RoPE positions (a tree node: prefix length + depth - 1)
    slots: list[int]  # [B] cache slot of each sequence
    num_rows: list[int]  # [B] new rows of each sequence
    tree_masks: list[torch.Tensor | None]  # [B] each [rows_b, rows_b] bool among the new rows; None = causal

    @classmethod
    def chain(cls, slots: list[int], token_lists: list[list[int]], starts: list[int],
              device: torch.device | str = "cpu") -> "ForwardBatch":
        """Plain causal rows: sequence b's tokens at positions starts[b], starts[b]+1, ..."""
        ids = [t for tokens in token_lists for t in tokens]
        pos = [s + i for s, tokens in zip(starts, token_lists) for i in range(len(tokens))]
        return cls(torch.tensor(ids, dtype=torch.long, device=device),
                   torch.tensor(pos, dtype=torch.long, device=device),
                   list(slots), [len(t) for t in token_lists], [None] * len(slots))

    def last_rows(self) -> torch.Tensor:
        """[B] the index of each sequence's last row among the N (where its next-token logits are)."""
        return torch.tensor(self.num_rows).cumsum(0) - 1
