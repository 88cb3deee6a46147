"""Our Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2) over an explicit KV cache.

A forward takes a `ForwardBatch`: the new rows of one or more sequences, each sequence with its own cache slot,
explicit RoPE positions and an optional tree mask among its new rows. It can run any range of layers and return
hidden states, so drafters can exit early and actors can host a slice of layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from outrider.kernels.attention import QUERY_TILE, bucket_keys, tiled_attention
from outrider.kernels.linear import LinearKernel
from outrider.runtime.config import ModelConfig
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.rope import Rotary


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


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: LinearKernel  # hidden -> (heads + 2 kv_heads) * head_dim, q/k/v fused (biases too, for Qwen2)
    o: LinearKernel  # heads * head_dim -> hidden
    post_norm: torch.Tensor  # [hidden]
    gate_up: LinearKernel  # hidden -> 2 * intermediate, gate and up fused
    down: LinearKernel  # intermediate -> hidden


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden] compute dtype
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    head: LinearKernel  # hidden -> vocab

    @property
    def nbytes_per_token(self) -> int:
        """Weight bytes one decode step streams (embedding lookup excluded: it reads one row)."""
        linears = [k for lw in self.layers for k in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [self.head]
        return sum(k.nbytes for k in linears)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF semantics: normalise in fp32, cast back, then scale in the compute dtype. Per-row reductions only.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_positions: int | None = None):
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_positions = max_positions or config.max_position
        self.rotary = Rotary(config, self.max_positions, self.device)
        self.scale = config.head_dim ** -0.5

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def new_cache(self, num_slots: int, capacity: int, layers: range | None = None) -> KVCache:
        return KVCache.allocate(self.config, num_slots, min(capacity, self.max_positions), self.dtype,
                                self.device, layers)

    # -- the three pieces: embed, layers, head ----------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, hidden]
        return self.weights.embed[token_ids]

    def run_layers(self, h: torch.Tensor, batch: ForwardBatch, cache: KVCache, starts: list[int],
                   start: int, end: int) -> torch.Tensor:
        """Layers start..end-1 over hidden states h [N, hidden]; writes their K/V at `starts` in the cache."""
        ctx = self._context(batch, cache, starts)
        for index in range(start, end):
            h = self._layer(index, h, ctx)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return self.weights.head(rms_norm(h, self.weights.norm, self.config.rms_norm_eps)).float()

    def forward(self, batch: ForwardBatch, cache: KVCache, logits_rows: torch.Tensor | None = None,
                hidden_layers: tuple[int, ...] = ()) -> "ForwardOutput":
        """Run every layer, advance each sequence's cache length, return logits of `logits_rows` (default all).

        hidden_layers: also return the hidden state after each of these layers (0 = the embeddings)."""
        starts = [cache.lengths[s] for s in batch.slots]
        self._check_positions(batch, cache, starts)
        h = self.embed(batch.token_ids)
        hidden: dict[int, torch.Tensor] = {0: h} if 0 in hidden_layers else {}
        ctx = self._context(batch, cache, starts)
        for index in range(self.num_layers):
            h = self._layer(index, h, ctx)
            if index + 1 in hidden_layers:
                hidden[index + 1] = h
        for slot, rows in zip(batch.slots, batch.num_rows):
            cache.advance(slot, rows)
        rows = h if logits_rows is None else h[logits_rows]
        return ForwardOutput(self.logits(rows), hidden)

    # -- internals ---------------------------------------------------------------------------------------

    def _check_positions(self, batch: ForwardBatch, cache: KVCache, starts: list[int]) -> None:
        longest = max(s + n for s, n in zip(starts, batch.num_rows))
        if longest > cache.capacity:
            raise ValueError(f"sequence needs {longest} KV positions but the cache holds {cache.capacity}; "
                             "raise max_seq_len or shorten the request")

    def _layer(self, index: int, h: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        c, lw, batch = self.config, self.weights.layers[index], ctx.batch
        x = rms_norm(h, lw.input_norm, c.rms_norm_eps)
        qkv = lw.qkv(x)
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q = qkv[:, :q_size].reshape(-1, c.num_heads, c.head_dim)
        k = qkv[:, q_size:q_size + kv_size].reshape(-1, c.num_kv_heads, c.head_dim)
        v = qkv[:, q_size + kv_size:].reshape(-1, c.num_kv_heads, c.head_dim)
        q, k = Rotary.apply(q, *ctx.rope), Rotary.apply(k, *ctx.rope)
        # Write before attending (batch-invariance rule R4): every query reads its keys from the cache.
        for slot, start, kb, vb in zip(batch.slots, ctx.starts, k.split(batch.num_rows), v.split(batch.num_rows)):
            ctx.cache.write(index, slot, start, kb, vb)
        attn = self._attend(index, q, ctx.cache, ctx.masks)
        h = h + lw.o(attn.reshape(-1, q_size))
        x = rms_norm(h, lw.post_norm, c.rms_norm_eps)
        gate, up = lw.gate_up(x).chunk(2, dim=-1)
        return h + lw.down(F.silu(gate) * up)

    def _attend(self, index: int, q: torch.Tensor, cache: KVCache, masks: "TileMasks") -> torch.Tensor:
        kc, vc = cache.layer(index)
        keys = masks.mask.shape[-1]
        qt = q.new_zeros(masks.mask.shape[0] * QUERY_TILE, *q.shape[1:])
        qt[masks.row_index] = q  # scatter rows into their tiles; pad rows stay zero
        qt = qt.view(-1, QUERY_TILE, *q.shape[1:])
        if masks.single_slot is not None:  # all tiles read one sequence: a view, no copy
            k = kc[masks.single_slot, :, :keys].expand(qt.shape[0], -1, -1, -1)
            v = vc[masks.single_slot, :, :keys].expand(qt.shape[0], -1, -1, -1)
        else:
            k, v = kc[masks.tile_slots, :, :keys], vc[masks.tile_slots, :, :keys]
        out = tiled_attention(qt, k, v, masks.mask, self.scale)
        return out.reshape(-1, *q.shape[1:])[masks.row_index]

    def _context(self, batch: ForwardBatch, cache: KVCache, starts: list[int]) -> "_Context":
        masks = TileMasks.build(batch, starts, self.config.sliding_window, cache.capacity, self.device)
        return _Context(batch, cache, starts, masks, self.rotary.tables(batch.positions, self.dtype))


@dataclass(frozen=True)
class _Context:
    """What every layer of one forward shares."""

    batch: ForwardBatch
    cache: KVCache
    starts: list[int]  # [B] cache length of each sequence before this forward
    masks: "TileMasks"
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [N, 1, head_dim]


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # [rows, vocab] float32
    hidden: dict[int, torch.Tensor]  # layer -> [N, hidden]


@dataclass(frozen=True)
class TileMasks:
    """Where each row sits among the fixed-size query tiles, and what each tile row may attend to."""

    mask: torch.Tensor  # [tiles, QUERY_TILE, keys] bool
    row_index: torch.Tensor  # [N] flat tile-row of each batch row
    tile_slots: torch.Tensor  # [tiles] cache slot each tile reads
    single_slot: int | None  # set when every tile reads the same slot

    @classmethod
    def build(cls, batch: ForwardBatch, starts: list[int], window: int | None, capacity: int,
              device: torch.device) -> "TileMasks":
        keys = bucket_keys(max(s + n for s, n in zip(starts, batch.num_rows)), capacity)
        tile_masks, row_index, tile_slots, tiles_before = [], [], [], 0
        for slot, start, rows, tree in zip(batch.slots, starts, batch.num_rows, batch.tree_masks):
            n_tiles = -(-rows // QUERY_TILE)
            m = torch.zeros(n_tiles * QUERY_TILE, keys, dtype=torch.bool)
            m[:rows, :start] = True  # the committed prefix
            new = torch.ones(rows, rows, dtype=torch.bool).tril() if tree is None else tree.cpu()
            m[:rows, start:start + rows] = new
            if window is not None:  # Mistral: a query sees at most `window` keys back
                q_at = torch.arange(start, start + rows)[:, None]
                m[:rows] &= (q_at - torch.arange(keys)[None]) < window
            m[rows:, 0] = True  # pad rows attend to one key so softmax stays finite; their output is dropped
            tile_masks.append(m.view(n_tiles, QUERY_TILE, keys))
            row_index.append(torch.arange(rows) + tiles_before * QUERY_TILE)
            tile_slots += [slot] * n_tiles
            tiles_before += n_tiles
        single = batch.slots[0] if len(set(batch.slots)) == 1 else None
        return cls(torch.cat(tile_masks).to(device), torch.cat(row_index).to(device),
                   torch.tensor(tile_slots, device=device), single)
