"""Reusing K/V a cache already holds: a new sequence whose prompt starts like what another slot holds (the previous
turn of a chat, a shared system prompt, another of n choices) copies that prefix's K/V instead of recomputing it.

Lossless: the K/V at position i depends only on tokens 0..i (causal attention, RoPE at the position), and the kernels
are batch- and chunk-invariant, so the copied K/V is bitwise what a prefill would have written.

A slot's tokens are remembered after release until the slot is taken again, and free slots are taken least recently
released first (`KVCache.acquire`): the cache evicts least recently used, a slot at a time. llama.cpp's server
reuses the slot whose prompt shares the longest prefix in the same way; vLLM and SGLang hash fixed-size blocks of a
paged cache. Copying a prefix between the slots of a contiguous cache needs no block table, and costs a memory copy
(about 9 ms for 1,500 positions of the 1.5B target in float32) against seconds of prefill.
"""
from __future__ import annotations

from outrider.runtime.kv_cache import KVCache


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def longest_prefix(tokens: list[int], holdings: dict[int, list[int]]) -> tuple[int | None, int]:
    """(slot, length) of the holding sharing the longest prefix with `tokens` ((None, 0) when none shares any)."""
    best, length = None, 0
    for slot, held in holdings.items():
        n = common_prefix(held, tokens)
        if n > length:
            best, length = slot, n
    return best, length


class HeldTokens:
    """The tokens whose K/V each slot of a cache holds as a chain (position i holds tokens[i] after tokens[:i]).

    The owner of the cache reports every write (`appended`), rollback (`truncated`) and tree-path compaction
    (`compacted`). Rows scored as a draft tree are not a chain until verification keeps a path of them, so they
    count only once truncated or compacted."""

    def __init__(self, num_slots: int) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]
        self.tree_from: dict[int, int] = {}  # slot -> where its uncompacted tree rows start
        # a slot just taken again -> what it held: its own best candidate until anything is written to it
        self.former: dict[int, list[int]] = {}

    def acquired(self, slot: int) -> None:
        self.former[slot] = self.tokens[slot]
        self.tokens[slot] = []
        self.tree_from.pop(slot, None)

    def released(self, slot: int) -> None:
        """The slot's K/V stays readable until the slot is taken again; a tree left unverified is cut off."""
        if slot in self.tree_from:
            del self.tokens[slot][self.tree_from.pop(slot):]

    def appended(self, slot: int, tokens: list[int], tree: bool = False) -> None:
        self.former.pop(slot, None)
        if tree and slot not in self.tree_from:
            self.tree_from[slot] = len(self.tokens[slot])
        self.tokens[slot] += tokens

    def truncated(self, slot: int, length: int) -> None:
        """Rollback; after tree rows, what verification keeps this way is a path down the first nodes: a chain."""
        del self.tokens[slot][length:]
        self.tree_from.pop(slot, None)

    def compacted(self, slot: int, start: int, keep: list[int]) -> None:
        held = self.tokens[slot]
        self.tokens[slot] = held[:start] + [held[start + i] for i in keep]
        self.tree_from.pop(slot, None)

    def chains(self, exclude: int) -> dict[int, list[int]]:
        """Every other slot's chain tokens (a slot with tree rows pending: up to them)."""
        return {s: t[:self.tree_from.get(s, len(t))] for s, t in enumerate(self.tokens) if s != exclude and t}

    def candidates(self, slot: int) -> dict[int, list[int]]:
        """What the new sequence in `slot` can start from: every other slot's chain, and what `slot` itself held
        before it was taken again (used in place)."""
        return self.chains(exclude=slot) | ({slot: self.former[slot]} if self.former.get(slot) else {})

    def reuse(self, cache: KVCache, slot: int, tokens: list[int]) -> tuple[int | None, int]:
        """Copy into the empty `slot` the K/V of the longest prefix of `tokens` another slot holds: (the slot it
        came from, how many positions) — (None, 0) when no slot shares a first token."""
        assert cache.lengths[slot] == 0 and not self.tokens[slot], "reuse fills an empty slot"
        source, n = longest_prefix(tokens, self.candidates(slot))
        self.former.pop(slot, None)
        if source is not None:
            cache.copy_prefix(source, slot, n)
            self.tokens[slot] = tokens[:n]
        return source, n
