"""Static-shape steps over a static KV cache, replayed as CUDA graphs on a GPU.

Eager decoding of a 1.5B model on a GPU is host-bound: about a thousand kernel launches per token at ~10 µs each,
against ~1 ms of weight traffic. Captured once into a `torch.cuda.CUDAGraph`, a step replays at ~1 µs per kernel.
Capture fixes every shape and address, so a `StaticRunner` is one sequence with:

- rows padded to one WIDTH for every call — decode, verify and prefill chunks alike. One shape means one set of
  kernels, so a position's logits are bitwise the same whether it is decoded alone or verified among k + 1 rows:
  that is what keeps speculative greedy output identical to plain decoding;
- the committed length, RoPE positions and the tree mask in device buffers, filled before each replay;
- K/V of all WIDTH rows written at length..length+WIDTH-1 before attending, so every query reads its keys from the
  cache whatever else the step holds. Rows past the real ones write there too; those positions are past the
  committed length, so they are masked now and overwritten later. Hence the cache holds `capacity + WIDTH`
  positions;
- attention over the whole static cache under a mask built on the device (prefix, then the tree among new rows).

A `DraftLoop` captures a whole draft round in one graph: catch up on the committed tokens, then k - 1 greedy steps,
each step's argmax feeding the next on the device, so a round costs one replay and one host sync.

Off CUDA the same code runs eagerly (tests check it on the CPU). `outrider.scheduler.graphed` plugs both into the
engine's `TargetModel` and `Drafter` seams, so the one speculative loop drives them unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from outrider.kernels.attention import tiled_attention
from outrider.runtime.model import ForwardContext, Transformer

DEFAULT_WIDTH = 8  # k + 1 <= 8 verifies in one replay; DenseLinear computes in 8-row blocks anyway


@dataclass(frozen=True)
class _Rows:
    """The part of a `ForwardBatch` the layers read: one sequence (slot 0) of `width` rows."""

    slots: list[int]
    num_rows: list[int]


@dataclass(frozen=True)
class _StaticWrites:
    """The cache seen by the layers: K/V land at device-side positions, so no host integer enters the graph."""

    keys: list[torch.Tensor]  # per layer [kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [width] cache index of each row

    def write(self, index: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[index].index_copy_(1, self.positions, k.transpose(0, 1))
        self.values[index].index_copy_(1, self.positions, v.transpose(0, 1))

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]


@dataclass(frozen=True)
class _MaskedPlan:
    """Every row attends over the whole static cache; the mask says which keys it may see."""

    mask: torch.Tensor  # [width, capacity] bool

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        return tiled_attention(q[None], k_cache[None], v_cache[None], self.mask[None], scale)[0]


class StaticRunner:
    """One sequence's K/V and its fixed-width forward; on CUDA the forward is captured once and replayed."""

    def __init__(self, model: Transformer, width: int = DEFAULT_WIDTH, capacity: int = 2048,
                 use_graph: bool | None = None):
        if model.config.sliding_window is not None:
            raise ValueError("graph decoding does not support sliding-window attention (Mistral) yet")
        self.model, self.width, self.capacity = model, width, capacity
        dev, c = model.device, model.config
        shape = (c.num_kv_heads, capacity + width, c.head_dim)
        self.keys = [torch.zeros(shape, dtype=model.dtype, device=dev) for _ in range(c.num_layers)]
        self.values = [torch.zeros(shape, dtype=model.dtype, device=dev) for _ in range(c.num_layers)]
        self.length = 0  # committed positions (host mirror of the `start` buffer)
        # Inputs: the host fills these before a replay.
        self.tokens = torch.zeros(width, dtype=torch.long, device=dev)
        self.start = torch.zeros((), dtype=torch.long, device=dev)
        self.depth = torch.arange(width, device=dev)  # RoPE offset of each row from start (a tree: depth - 1)
        self.tree = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: torch.Tensor | None = None

    # -- the step -------------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, start: torch.Tensor, depth: torch.Tensor,
                tree: torch.Tensor) -> torch.Tensor:
        """Logits [width, vocab] float32 of `tokens` [width] whose row i sits at cache index start + i and RoPE
        position start + depth[i], seeing the prefix < start and the new rows `tree` allows. Pure device work."""
        m, w = self.model, self.width
        keys = torch.arange(self.capacity + w, device=tokens.device)
        rel = keys - start  # a key's index among the new rows (negative: the committed prefix)
        among_new = tree[:, rel.clamp(0, w - 1)] & (rel >= 0) & (rel < w)
        mask = (rel < 0)[None] | among_new
        writes = _StaticWrites(self.keys, self.values, start + torch.arange(w, device=tokens.device))
        ctx = ForwardContext(_Rows([0], [w]), writes, [0], _MaskedPlan(mask), m.rotary.tables(start + depth, m.dtype))
        h = m.embed(tokens)
        for index in range(m.num_layers):
            h = m.layer(index, h, ctx)  # the model's own layer math: one place for it
        return m.logits(h)

    def run(self, tokens: list[int], tree: torch.Tensor | None = None,
            depth: list[int] | None = None) -> torch.Tensor:
        """Append `tokens` (<= width) after the committed length and return their logits [rows, vocab]; the
        length does not move (call `commit`)."""
        rows = len(tokens)
        if not 0 < rows <= self.width:
            raise ValueError(f"a static step takes 1..{self.width} rows, got {rows}")
        if self.length + rows > self.capacity:
            raise ValueError(f"sequence needs {self.length + rows} KV positions but the cache holds {self.capacity}")
        self.fill(tokens, tree, depth)
        return self._replay()[:rows]

    def commit(self, length: int) -> None:
        """Set the committed length: after a verify, the accepted prefix; rolling back is the same call."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length {length} outside 0..{self.capacity}")
        self.length = length

    def fill(self, tokens: list[int], tree: torch.Tensor | None, depth: list[int] | None) -> None:
        """Load the input buffers for rows at the committed length: tokens padded to the width, the tree among
        them (default: a chain) and their depths; pad rows form a chain after the real ones."""
        rows, w = len(tokens), self.width
        self.tokens.copy_(torch.tensor(tokens + [0] * (w - rows)), non_blocking=True)
        self.start.fill_(self.length)
        full = torch.ones(w, w, dtype=torch.bool).tril()
        if tree is not None:
            full[:rows, :rows] = tree
        self.tree.copy_(full, non_blocking=True)
        d = list(range(w)) if depth is None else list(depth) + list(range(rows, w))
        self.depth.copy_(torch.tensor(d), non_blocking=True)

    def _replay(self) -> torch.Tensor:
        if not self.use_graph:
            return self.forward(self.tokens, self.start, self.depth, self.tree)
        if self._graph is None:
            self._graph, self._out = capture(lambda: self.forward(self.tokens, self.start, self.depth, self.tree))
        self._graph.replay()
        return self._out


def capture(fn: Callable[[], torch.Tensor]) -> tuple["torch.cuda.CUDAGraph", torch.Tensor]:
    """Warm `fn` up on a side stream (allocator and cuBLAS workspaces settle), then capture it once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class DraftLoop:
    """A greedy draft round in one replay: feed up to `width` committed tokens, then k - 1 single steps.

    It shares the runner's cache and step. The steps after the catch-up use width-`width` forwards too (one
    real row): on a GPU extra rows are free, and one captured shape is simpler than two."""

    def __init__(self, runner: StaticRunner):
        self.runner = runner
        self.fed = torch.zeros((), dtype=torch.long, device=runner.model.device)  # real rows of the catch-up
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def round(self, k: int) -> torch.Tensor:
        """Draft tokens [k] on the device after the runner's buffers were filled with the catch-up rows."""
        r = self.runner
        if not r.use_graph:
            return self._round(k)
        if k not in self._graphs:
            self._graphs[k] = capture(lambda: self._round(k))
        graph, out = self._graphs[k]
        graph.replay()
        return out

    def _round(self, k: int) -> torch.Tensor:
        r = self.runner
        logits = r.forward(r.tokens, r.start, r.depth, r.tree)
        token = logits.index_select(0, (self.fed - 1).reshape(1)).argmax(-1)  # [1]: d_1
        drafts, start = [token], r.start + self.fed
        pad = torch.zeros(r.width - 1, dtype=torch.long, device=token.device)
        for _ in range(k - 1):
            step = r.forward(torch.cat([token, pad]), start, r.depth, r.tree)
            token, start = step[:1].argmax(-1), start + 1
            drafts.append(token)
        return torch.cat(drafts)
