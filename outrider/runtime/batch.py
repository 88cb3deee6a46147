"""What one forward takes: the new rows of one or more sequences, each with its cache slot and RoPE positions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TreeRows:
    """A sequence's new rows as a tree: row 0 is the pending token (depth 0), each draft node sits at its depth;
    `mask[i, j]` says row i attends to row j (itself and its ancestors). Positions are cache length + depth."""

    depths: list[int]  # [rows]
    mask: np.ndarray  # [rows, rows] bool

    @classmethod
    def of(cls, parents: list[int]) -> "TreeRows":
        """The pending token, then draft nodes with parent node indices `parents` (-1: a child of the pending
        token; every parent before its child): node i is row i + 1."""
        n = len(parents) + 1
        depths, mask = [0], np.eye(n, dtype=bool)
        for i, parent in enumerate(parents, start=1):
            if not -1 <= parent < i - 1:
                raise ValueError(f"tree node {i - 1} has parent {parent}: parents must come before their children")
            depths.append(depths[parent + 1] + 1)
            mask[i] |= mask[parent + 1]
        return cls(depths, mask)


@dataclass(frozen=True)
class ForwardBatch:
    """New rows of B sequences, concatenated sequence after sequence (N = sum(num_rows))."""

    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64 RoPE positions (a tree node: prefix length + depth - 1)
    slots: list[int]  # [B] cache slot of each sequence
    num_rows: list[int]  # [B] new rows of each sequence
    # [B] each [rows_b, prior_b + rows_b] bool, or None = causal. Columns are the `prior_b` cached positions just
    # before the new rows (a draft tree grown over several forwards keeps its earlier nodes there), then the new
    # rows; every position before those is visible to all rows.
    tree_masks: list[torch.Tensor | None]

    @classmethod
    def chain(cls, slots: list[int], token_lists: list[list[int]], starts: list[int],
              device: torch.device | str = "cpu") -> "ForwardBatch":
        """Plain causal rows: sequence b's tokens at positions starts[b], starts[b]+1, ..."""
        ids = [t for tokens in token_lists for t in tokens]
        pos = [s + i for s, tokens in zip(starts, token_lists) for i in range(len(tokens))]
        return cls(torch.tensor(ids, dtype=torch.long, device=device),
                   torch.tensor(pos, dtype=torch.long, device=device),
                   list(slots), [len(t) for t in token_lists], [None] * len(slots))

    @classmethod
    def rows(cls, slots: list[int], token_lists: list[list[int]], starts: list[int],
             trees: list[TreeRows | None] | None, device: torch.device | str = "cpu") -> "ForwardBatch":
        """Each sequence's rows as a chain (its tree None) or as a draft tree at positions start + depth."""
        chain = cls.chain(slots, token_lists, starts, device)
        if not trees or not any(trees):
            return chain
        pos = [s + (t.depths[i] if t else i) for s, tokens, t in zip(starts, token_lists, trees)
               for i in range(len(tokens))]
        masks = [None if t is None else torch.from_numpy(np.array(t.mask, dtype=bool)) for t in trees]
        return cls(chain.token_ids, torch.tensor(pos, dtype=torch.long, device=device), chain.slots, chain.num_rows,
                   masks)

    def prior(self, b: int) -> int:
        """Cached positions before sequence b's new rows that its tree mask covers (0 for a chain)."""
        mask = self.tree_masks[b]
        return 0 if mask is None else mask.shape[1] - mask.shape[0]

    def last_rows(self) -> torch.Tensor:
        """[B] the index of each sequence's last row among the N (where its next-token logits are)."""
        return torch.tensor(self.num_rows).cumsum(0) - 1
