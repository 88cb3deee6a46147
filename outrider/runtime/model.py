"""Our Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2) over an explicit KV cache.

A forward takes a `ForwardBatch`: the new rows of one or more sequences, each sequence with its own cache slot,
explicit RoPE positions and an optional tree mask among its new rows. It can run any range of layers and return
hidden states, so drafters can exit early and actors can host a slice of layers.

The layer API is public, for code that runs layers in its own order (layer-parallel drafting, static CUDA-graph
steps, layer-split actors): `context` builds what every layer of one forward shares, `layer`, `attention` and
`mlp` run one layer or one of its two residual branches, `run_layers` a range, and `ForwardContext.advance` moves
the sequences' cache lengths past the rows once the forward is done. `attention_branch` and `mlp_branch` are the
layer math itself, over any `LayerWeights`, which a draft head with layers of its own reuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from outrider.kernels.gguf import GGUFLinear
from outrider.kernels.linear import LinearKernel
from outrider.kernels.native import load as load_native
from outrider.runtime.attention import AttentionPlan, ExactPlan, NativePlan, TiledPlan
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.config import ModelConfig
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.rope import Rotary

# attend(q [N, heads, hd], k [N, kv_heads, hd], v [N, kv_heads, hd]) -> [N, heads, hd]: the new rows' attention,
# wherever their keys live (a KV cache, or only the rows themselves when training)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor | None  # [hidden]; None: no norm before attention (a draft head's first layer)
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


Norm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [N, hidden], weight [hidden]) -> [N, hidden]


def attention_branch(h: torch.Tensor, lw: LayerWeights, c: ModelConfig, rope: tuple[torch.Tensor, torch.Tensor],
                     attend: Attend, norm: Norm | None = None) -> torch.Tensor:
    """A Llama layer's attention residual branch from h [N, hidden]: norm, fused q/k/v projection, RoPE on q and k,
    `attend`, output projection. Returns [N, hidden], to be added to h. `norm` defaults to `rms_norm`."""
    norm = norm or (lambda x, w: rms_norm(x, w, c.rms_norm_eps))
    x = h if lw.input_norm is None else norm(h, lw.input_norm)
    qkv = lw.qkv(x)
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    # q and k heads sit side by side in the fused projection: rotate them in one go.
    qk = Rotary.apply(qkv[:, :q_size + kv_size].reshape(-1, c.num_heads + c.num_kv_heads, c.head_dim), *rope)
    q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]
    v = qkv[:, q_size + kv_size:].reshape(-1, c.num_kv_heads, c.head_dim)
    return lw.o(attend(q, k, v).reshape(-1, q_size))


def mlp_branch(h: torch.Tensor, lw: LayerWeights, c: ModelConfig) -> torch.Tensor:
    """A Llama layer's MLP residual branch from h [N, hidden]: down(SiLU(gate) * up) of the normed h."""
    gate, up = lw.gate_up(rms_norm(h, lw.post_norm, c.rms_norm_eps)).chunk(2, dim=-1)
    return lw.down(F.silu(gate) * up)


@dataclass(frozen=True)
class ForwardContext:
    """What every layer of one forward shares."""

    batch: ForwardBatch
    cache: KVCache
    starts: list[int]  # [B] cache length of each sequence before this forward
    plan: AttentionPlan
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [N, 1, head_dim] (fp32 on the native path)

    def advance(self) -> None:
        """The forward is done: each sequence's cache now holds its new rows."""
        for slot, rows in zip(self.batch.slots, self.batch.num_rows):
            self.cache.advance(slot, rows)


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # [rows, vocab] float32
    hidden: dict[int, torch.Tensor]  # layer -> [N, hidden]


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

    # -- a whole forward ---------------------------------------------------------------------------------

    def forward(self, batch: ForwardBatch, cache: KVCache, logits_rows: torch.Tensor | None = None,
                hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        """Run every layer, advance each sequence's cache length, return logits of `logits_rows` (default all).

        hidden_layers: also return the hidden state after each of these layers (0 = the embeddings)."""
        ctx = self.context(batch, cache)
        h = self.embed(batch.token_ids)
        hidden: dict[int, torch.Tensor] = {0: h} if 0 in hidden_layers else {}
        bounds = sorted({0, self.num_layers} | {i for i in hidden_layers if 0 < i < self.num_layers})
        for start, end in zip(bounds, bounds[1:]):
            h = self.run_layers(h, ctx, start, end)
            if end in hidden_layers:
                hidden[end] = h
        ctx.advance()
        rows = h if logits_rows is None else h[logits_rows]
        return ForwardOutput(self.logits(rows), hidden)

    def prefill(self, cache: KVCache, slot: int, tokens: list[int], chunk: int = 256) -> None:
        """Append tokens' K/V to a sequence without computing logits, `chunk` rows per forward (bounds
        activation memory; the row-invariant kernels make any chunking give the same K/V)."""
        no_logits = torch.empty(0, dtype=torch.long)
        for i in range(0, len(tokens), chunk):
            part = tokens[i:i + chunk]
            self.forward(ForwardBatch.chain([slot], [part], [cache.lengths[slot]], self.device), cache, no_logits)

    # -- the pieces: embed, context, layers, head ----------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, hidden]
        return self.weights.embed[token_ids]

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return self.weights.head(self._norm(h, self.weights.norm)).float()

    def context(self, batch: ForwardBatch, cache: KVCache) -> ForwardContext:
        """What the layers of one forward over `batch` share; its rows go at each sequence's cache length."""
        self.check_capacity(batch, cache)
        starts = [cache.lengths[s] for s in batch.slots]
        plan_type = NativePlan if self.native else TiledPlan if self.batch_invariant else ExactPlan
        plan = plan_type.build(batch, starts, self.config.sliding_window, cache.capacity, self.device)
        # the native RoPE computes in fp32 and rounds once, so it takes fp32 tables
        rope = self.rotary.tables(batch.positions, torch.float32 if self.native else self.dtype)
        return ForwardContext(batch, cache, starts, plan, rope)

    @staticmethod
    def check_capacity(batch: ForwardBatch, cache: KVCache) -> None:
        """ValueError unless every sequence's new rows fit its cache slot."""
        longest = max(cache.lengths[s] + n for s, n in zip(batch.slots, batch.num_rows))
        if longest > cache.capacity:
            raise ValueError(f"sequence needs {longest} KV positions but the cache holds {cache.capacity}; "
                             "raise max_seq_len or shorten the request")

    def layer(self, index: int, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Layer `index` over h [N, hidden]; writes the rows' K/V into the cache."""
        h = h + self.attention(index, h, ctx)
        return h + self.mlp(index, h)

    def run_layers(self, h: torch.Tensor, ctx: ForwardContext, start: int, end: int) -> torch.Tensor:
        """Layers start..end-1: in one C++ call where the native ops run with GGUF-format linears (the same ops in
        the same order, bitwise the per-layer path; only the Python between them goes), else layer by layer."""
        fused = self._fused_args(start, end) if isinstance(ctx.plan, NativePlan) else None
        if fused is None:
            for index in range(start, end):
                h = self.layer(index, h, ctx)
            return h
        caches = [ctx.cache.layer(i) for i in range(start, end)]
        p = ctx.plan
        return torch.ops.outrider.decoder_layers(h, *fused, [k for k, _ in caches], [v for _, v in caches], *ctx.rope,
                                                 p.slot, p.write_pos, p.lo, p.prefix_end, p.mask, self.scale,
                                                 self.config.rms_norm_eps, self.config.num_heads)

    def attention(self, index: int, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Layer `index`'s attention residual branch from h [N, hidden]; writes the rows' K/V into the cache."""
        c, lw, batch = self.config, self.weights.layers[index], ctx.batch
        if isinstance(ctx.plan, NativePlan):  # RoPE, the K/V write and attention: two C++ calls
            qkv = lw.qkv(self._norm(h, lw.input_norm))
            kc, vc = ctx.cache.layer(index)
            q = torch.ops.outrider.rope_store(qkv, *ctx.rope, kc, vc, ctx.plan.slot, ctx.plan.write_pos, c.num_heads)
            return lw.o(ctx.plan.attend(q, kc, vc, self.scale).reshape(-1, c.num_heads * c.head_dim))

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # Write before attending: every query reads its keys from the cache, so a row's keys are the same
            # tensor whether it is scored alone or among others (batch invariance).
            for slot, start, kb, vb in zip(batch.slots, ctx.starts, k.split(batch.num_rows), v.split(batch.num_rows)):
                ctx.cache.write(index, slot, start, kb, vb)
            return ctx.plan.attend(q, *ctx.cache.layer(index), self.scale)

        return attention_branch(h, lw, c, ctx.rope, attend, self._norm)

    def mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s MLP residual branch from h [N, hidden]."""
        lw = self.weights.layers[index]
        if self.native:
            return lw.down(torch.ops.outrider.silu_mul(lw.gate_up(self._norm(h, lw.post_norm))))
        return mlp_branch(h, lw, self.config)

    # -- internals ---------------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.native:  # one C++ call; torch's CPU rms_norm runs ~8 ops for bf16 (about 50 us per call here)
            return torch.ops.outrider.rms_norm(x, weight, self.config.rms_norm_eps)
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def _fused_args(self, start: int, end: int) -> tuple[list[torch.Tensor], list[int]] | None:
        """`decoder_layers`' weights and metadata for layers start..end-1, built once; None unless every linear
        of them is a GGUFLinear."""
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
