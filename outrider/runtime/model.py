"""Our Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2) over an explicit KV cache.

A forward takes a `ForwardBatch`: the new rows of one or more sequences, each sequence with its own cache slot,
explicit RoPE positions and an optional tree mask among its new rows. It can run any range of layers and return
hidden states, so drafters can exit early and actors can host a slice of layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from outrider.kernels.linear import LinearKernel
from outrider.kernels.native import load as load_native
from outrider.runtime.config import ModelConfig
from outrider.runtime.attention import AttentionPlan, ExactPlan, NativePlan, TiledPlan
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
    # One fused per-row op (accumulates in fp32) instead of HF's eight: it runs twice per layer per step.
    return F.rms_norm(x, weight.shape, weight, eps)


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_positions: int | None = None,
                 batch_invariant: bool = True, native: bool | None = None):
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_positions = max_positions or config.max_position
        self.rotary = Rotary(config, self.max_positions, self.device)
        self.scale = config.head_dim ** -0.5
        # A target must be batch-invariant (lossless verification); a draft need not, and runs cheaper without.
        # The native CPU kernels are both invariant and the cheapest, so they serve both where they run
        # (native=None: wherever they can; False pins the torch path, to compare the two).
        self.batch_invariant = batch_invariant
        self.native = NativePlan.supports(dtype, config.head_dim, self.device) if native is None else native
        if self.native:
            load_native()
        self._fused: dict[tuple[int, int], tuple[list[torch.Tensor], list[int]] | None] = {}

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
        self._check_positions(batch, cache, starts)
        return self._layers(h, self._context(batch, cache, starts), start, end)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return self.weights.head(self._norm(h, self.weights.norm)).float()

    def forward(self, batch: ForwardBatch, cache: KVCache, logits_rows: torch.Tensor | None = None,
                hidden_layers: tuple[int, ...] = ()) -> "ForwardOutput":
        """Run every layer, advance each sequence's cache length, return logits of `logits_rows` (default all).

        hidden_layers: also return the hidden state after each of these layers (0 = the embeddings)."""
        starts = [cache.lengths[s] for s in batch.slots]
        self._check_positions(batch, cache, starts)
        h = self.embed(batch.token_ids)
        hidden: dict[int, torch.Tensor] = {0: h} if 0 in hidden_layers else {}
        ctx = self._context(batch, cache, starts)
        bounds = sorted({0, self.num_layers} | {i for i in hidden_layers if 0 < i < self.num_layers})
        for start, end in zip(bounds, bounds[1:]):
            h = self._layers(h, ctx, start, end)
            if end in hidden_layers:
                hidden[end] = h
        for slot, rows in zip(batch.slots, batch.num_rows):
            cache.advance(slot, rows)
        rows = h if logits_rows is None else h[logits_rows]
        return ForwardOutput(self.logits(rows), hidden)

    def prefill(self, cache: KVCache, slot: int, tokens: list[int], chunk: int = 256) -> None:
        """Append tokens' K/V to a sequence without computing logits, `chunk` rows per forward (bounds
        activation memory; the row-invariant kernels make any chunking give the same K/V)."""
        no_logits = torch.empty(0, dtype=torch.long)
        for i in range(0, len(tokens), chunk):
            part = tokens[i:i + chunk]
            self.forward(ForwardBatch.chain([slot], [part], [cache.lengths[slot]], self.device), cache, no_logits)

    def forward_grouped(self, batch: ForwardBatch, cache: KVCache, groups: list[range], whole_layers: bool = False,
                        logits_rows: torch.Tensor | None = None) -> "ForwardOutput":
        """`forward` with the layers in consecutive `groups` (covering 0..num_layers-1) whose members run in
        parallel from the group's input (`_parallel_group`); a group of one layer is that layer, exact. With every
        group a single layer this is `forward`, bit for bit."""
        assert [i for g in groups for i in g] == list(range(self.num_layers)), groups
        starts = [cache.lengths[s] for s in batch.slots]
        self._check_positions(batch, cache, starts)
        h = self.embed(batch.token_ids)
        ctx = self._context(batch, cache, starts)
        for group in groups:
            h = self._layer(group[0], h, ctx) if len(group) == 1 else self._parallel_group(group, h, ctx, whole_layers)
        for slot, rows in zip(batch.slots, batch.num_rows):
            cache.advance(slot, rows)
        return ForwardOutput(self.logits(h if logits_rows is None else h[logits_rows]), {})

    # -- internals ---------------------------------------------------------------------------------------

    def _check_positions(self, batch: ForwardBatch, cache: KVCache, starts: list[int]) -> None:
        longest = max(s + n for s, n in zip(starts, batch.num_rows))
        if longest > cache.capacity:
            raise ValueError(f"sequence needs {longest} KV positions but the cache holds {cache.capacity}; "
                             "raise max_seq_len or shorten the request")

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.native:  # one C++ call; torch's CPU rms_norm runs ~8 ops for bf16 (about 50 us per call here)
            return torch.ops.outrider.rms_norm(x, weight, self.config.rms_norm_eps)
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def _layer(self, index: int, h: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        h = h + self._attention(index, h, ctx)
        return h + self._mlp(index, h)

    def _layers(self, h: torch.Tensor, ctx: "_Context", start: int, end: int) -> torch.Tensor:
        """Layers start..end-1: in one C++ call where the native ops run with GGUF-format linears (the same ops in
        the same order, bitwise the per-layer path; only the Python between them goes), else layer by layer."""
        fused = self._fused_args(start, end) if isinstance(ctx.plan, NativePlan) else None
        if fused is None:
            for index in range(start, end):
                h = self._layer(index, h, ctx)
            return h
        caches = [ctx.cache.layer(i) for i in range(start, end)]
        p = ctx.plan
        return torch.ops.outrider.decoder_layers(h, *fused, [k for k, _ in caches], [v for _, v in caches], *ctx.rope,
                                                 p.slot, p.write_pos, p.lo, p.prefix_end, p.mask, self.scale,
                                                 self.config.rms_norm_eps, self.config.num_heads)

    def _fused_args(self, start: int, end: int) -> tuple[list[torch.Tensor], list[int]] | None:
        """`decoder_layers`' weights and metadata for layers start..end-1, built once; None unless every linear
        of them is a GGUFLinear."""
        from outrider.kernels.gguf import GGUFLinear

        if (start, end) not in self._fused:
            tensors: list[torch.Tensor] = []
            meta: list[int] = []
            for lw in self.weights.layers[start:end]:
                linears = (lw.qkv, lw.o, lw.gate_up, lw.down)
                if not all(isinstance(k, GGUFLinear) for k in linears):
                    self._fused[start, end] = None
                    break
                tensors += [lw.input_norm, lw.post_norm]
                for k in linears:
                    meta += [len(k.parts), k.bias is not None, *k.type_ids, *k.rows]
                    tensors += k.parts + ([] if k.bias is None else [k.bias])
            else:
                self._fused[start, end] = (tensors, meta)
        return self._fused[start, end]

    def _attention(self, index: int, h: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        """Layer `index`'s attention residual branch from h [N, hidden]; writes the rows' K/V into the cache."""
        c, lw, batch = self.config, self.weights.layers[index], ctx.batch
        qkv = lw.qkv(self._norm(h, lw.input_norm))
        q_size = c.num_heads * c.head_dim
        if isinstance(ctx.plan, NativePlan):  # RoPE, the K/V write and attention: two C++ calls
            kc, vc = ctx.cache.layer(index)
            q = torch.ops.outrider.rope_store(qkv, *ctx.rope, kc, vc, ctx.plan.slot, ctx.plan.write_pos, c.num_heads)
            return lw.o(ctx.plan.attend(q, kc, vc, self.scale).reshape(-1, q_size))
        kv_size = c.num_kv_heads * c.head_dim
        # q and k heads sit side by side in the fused projection: rotate them in one go.
        qk = Rotary.apply(qkv[:, :q_size + kv_size].reshape(-1, c.num_heads + c.num_kv_heads, c.head_dim), *ctx.rope)
        q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]
        v = qkv[:, q_size + kv_size:].reshape(-1, c.num_kv_heads, c.head_dim)
        # Write before attending (batch-invariance rule R4): every query reads its keys from the cache.
        for slot, start, kb, vb in zip(batch.slots, ctx.starts, k.split(batch.num_rows), v.split(batch.num_rows)):
            ctx.cache.write(index, slot, start, kb, vb)
        attn = ctx.plan.attend(q, *ctx.cache.layer(index), self.scale)
        return lw.o(attn.reshape(-1, q_size))

    def _mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s MLP residual branch from h [N, hidden]."""
        lw = self.weights.layers[index]
        gate_up = lw.gate_up(self._norm(h, lw.post_norm))
        if self.native:
            return lw.down(torch.ops.outrider.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return lw.down(F.silu(gate) * up)

    def _parallel_group(self, group: range, h: torch.Tensor, ctx: "_Context", whole_layers: bool) -> torch.Tensor:
        """EasySpec's approximation (ALGORITHMS 3.2): every layer of the group reads the group input h, so on N
        devices they would run at once. Every member after the first reads the wrong input, so its K/V are
        fuzzy, and so is everything after the group.

        attention (variant A): a_j = Attn_j(h) for all j, then exactly chained h += a_j; h += MLP_j(h).
        whole layers (variant B): Δ_j = a_j + MLP_j(h + a_j) for all j, then h += Σ_j Δ_j."""
        if whole_layers:
            deltas = []
            for index in group:
                a = self._attention(index, h, ctx)
                deltas.append(a + self._mlp(index, h + a))
            return h + torch.stack(deltas).sum(0)
        branches = [self._attention(index, h, ctx) for index in group]
        for index, a in zip(group, branches):
            h = h + a
            h = h + self._mlp(index, h)
        return h

    def _context(self, batch: ForwardBatch, cache: KVCache, starts: list[int]) -> "_Context":
        plan_type = NativePlan if self.native else TiledPlan if self.batch_invariant else ExactPlan
        plan = plan_type.build(batch, starts, self.config.sliding_window, cache.capacity, self.device)
        # the native RoPE computes in fp32 and rounds once, so it takes fp32 tables
        rope = self.rotary.tables(batch.positions, torch.float32 if self.native else self.dtype)
        return _Context(batch, cache, starts, plan, rope)


@dataclass(frozen=True)
class _Context:
    """What every layer of one forward shares."""

    batch: ForwardBatch
    cache: KVCache
    starts: list[int]  # [B] cache length of each sequence before this forward
    plan: AttentionPlan
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [N, 1, head_dim] (fp32 on the native path)


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # [rows, vocab] float32
    hidden: dict[int, torch.Tensor]  # layer -> [N, hidden]
