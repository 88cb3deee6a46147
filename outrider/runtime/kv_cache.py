"""A preallocated KV cache with slots (one per sequence), rollback and tree-path compaction."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from outrider.runtime.config import ModelConfig


@dataclass
class KVCache:
    """K and V for layers `layer_start..layer_end-1`, `num_slots` sequences of up to `capacity` tokens each.

    `lengths[slot]` counts the tokens whose K/V are valid. A forward writes its rows at `lengths[slot] ...`
    and then `advance`s; verification rolls back with `truncate` or keeps a tree path with `compact`.
    """

    keys: list[torch.Tensor]  # per layer [num_slots, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]  # per layer [num_slots, kv_heads, capacity, head_dim]
    layer_start: int
    lengths: list[int]  # [num_slots]
    free_slots: list[int] = field(default_factory=list)

    @classmethod
    def allocate(cls, config: ModelConfig, num_slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", layers: range | None = None) -> "KVCache":
        layers = layers or range(config.num_layers)
        shape = (num_slots, config.num_kv_heads, capacity, config.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        return cls(keys, values, layers.start, [0] * num_slots, list(range(num_slots)))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def acquire(self, slot: int | None = None) -> int:
        """A free slot, the one released longest ago (a released slot's K/V stays readable until it is taken
        again: `runtime.prefix_cache` reuses it); `slot` takes that one (a follower mirroring its leader's)."""
        if not self.free_slots:
            raise RuntimeError(f"all {self.num_slots} KV cache slots are in use")
        if slot is None:
            slot = self.free_slots.pop(0)
        elif slot in self.free_slots:
            self.free_slots.remove(slot)
        else:
            raise RuntimeError(f"KV cache slot {slot} is in use")
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        assert slot not in self.free_slots, f"slot {slot} released twice"
        self.lengths[slot] = 0
        self.free_slots.append(slot)

    @property
    def slots_in_use(self) -> int:
        return self.num_slots - len(self.free_slots)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index - self.layer_start], self.values[index - self.layer_start]

    def write(self, index: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([rows, kv_heads, head_dim]) of layer `index` at positions start.. of `slot`."""
        kc, vc = self.layer(index)
        end = start + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"sequence needs {end} KV positions but the cache holds {self.capacity}; "
                             "raise the context length (max_seq_len) or shorten the request")
        kc[slot, :, start:end] = k.transpose(0, 1)
        vc[slot, :, start:end] = v.transpose(0, 1)

    def advance(self, slot: int, rows: int) -> None:
        self.lengths[slot] += rows

    def truncate(self, slot: int, length: int) -> None:
        """Roll back: forget every position >= length (the data stays; it is masked and later overwritten)."""
        assert 0 <= length <= self.lengths[slot], (length, self.lengths[slot])
        self.lengths[slot] = length

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Give the empty slot `dst` the K/V of `src`'s first `length` positions (which `src` may hold after its
        release: the data stays until the slot is written again). `src == dst`: a slot taken again keeps what it
        held, in place."""
        assert self.lengths[dst] == 0, (src, dst, self.lengths[dst])
        if src == dst:
            self.lengths[dst] = length
            return
        for kc, vc in zip(self.keys, self.values):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]
        self.lengths[dst] = length

    def compact(self, slot: int, start: int, keep: list[int]) -> None:
        """Keep a tree path: move positions start+keep[i] to start+i, then truncate to start+len(keep).

        Example: a tree of 5 nodes was written at 10..14 and the accepted path is nodes [0, 2, 3];
        positions 10, 12, 13 move to 10, 11, 12 and the length becomes 13.
        """
        src = torch.tensor([start + i for i in keep], dtype=torch.long, device=self.keys[0].device)
        dst = slice(start, start + len(keep))
        for kc, vc in zip(self.keys, self.values):
            kc[slot, :, dst] = kc[slot, :, src]
            vc[slot, :, dst] = vc[slot, :, src]
        self.truncate(slot, start + len(keep))
