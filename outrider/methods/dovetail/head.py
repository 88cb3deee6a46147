"""Dovetail's draft head ("Dovetail: A CPU/GPU Heterogeneous Speculative Decoding for LLM inference", EMNLP 2025):
Dynamic Gating Fusion of the target's features with token embeddings, then m Llama decoder layers (the runtime's own
layer math, `attention_branch` and `mlp_branch`, over trainable weights), then the target's own (frozen) final norm
and LM head. EAGLE-style: it drafts from the target's hidden states, not from tokens alone.

Notation, once. f_j is the target's *feature* at position j: its last decoder layer's output there, which the
target's final norm + LM head turn into the logits of token x_{j+1}. The head's input at its position j is the
*pair* (f_j, x_{j+1}); its output there is f̂_{j+1}, a prediction of the target's next feature, whose logits
(same norm + head) draft x_{j+2}. A sequence of n committed tokens (x_{n-1} pending, not scored by the target)
has features f_0..f_{n-2}, so n − 1 pairs; the last, (f_{n-2}, x_{n-1}), yields the first draft d_1. Drafting
d_2.. feeds the head its own prediction: (f̂_{n-1}, d_1), (f̂_n, d_2), ...

    DGF:  h1 = f·W1 ;  h2 = SiLU(RMSNorm(emb(x))·W2) ;  z = σ([h1; h2]·Wz) ;  h = z⊙h1 + (1−z)⊙h2
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from outrider.kernels.linear import DenseLinear
from outrider.runtime.attention import ExactPlan
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.config import ModelConfig
from outrider.runtime.kv_cache import KVCache
from outrider.runtime.model import Attend, LayerWeights, Transformer, attention_branch, mlp_branch, rms_norm
from outrider.runtime.prefix_cache import common_prefix
from outrider.runtime.rope import Rotary
from outrider.scheduler.drafters import CachedSequences, Draft, DraftRequest, DraftSeq
from outrider.scheduler.sampling import argmax, sample, warp
from outrider.scheduler.target import FeatureSource

# safetensors metadata "format"; the head's shape is in metadata "config" (JSON). v2: q/k/v and gate/up fused, as
# the runtime's layers lay them out.
HEAD_FORMAT = "outrider-dgf-v2"
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                "qkv_bias")  # the target fields a head's weights depend on


class TrainableLinear(DenseLinear):
    """`DenseLinear` over trainable fp32 weights as one F.linear, so gradients flow (the blocked call is for batch
    invariance, which a head does not need: the target verifies every draft it makes)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class HeadLayer(nn.Module):
    """A decoder layer of the head: the runtime's layout (q/k/v fused, gate/up fused) with trainable weights. Layer
    0 has no input norm: the fused h goes straight into attention, as in Dovetail's and EAGLE's heads."""

    def __init__(self, c: ModelConfig, first: bool):
        super().__init__()
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_norm = None if first else nn.Parameter(torch.ones(c.hidden_size))
        # Initialised as separate nn.Linear layers would be (PyTorch's default init, drawn in HF's order q, k, v, o,
        # gate, up, down), then fused.
        parts = {name: nn.Linear(i, o, bias=c.qkv_bias and name in "qkv") for name, i, o in (
            ("q", c.hidden_size, q), ("k", c.hidden_size, kv), ("v", c.hidden_size, kv), ("o", q, c.hidden_size),
            ("gate", c.hidden_size, c.intermediate_size), ("up", c.hidden_size, c.intermediate_size),
            ("down", c.intermediate_size, c.hidden_size))}
        self.qkv = nn.Parameter(torch.cat([parts[n].weight.detach() for n in "qkv"]))
        self.qkv_bias = nn.Parameter(torch.cat([parts[n].bias.detach() for n in "qkv"])) if c.qkv_bias else None
        self.o = nn.Parameter(parts["o"].weight.detach())
        self.post_norm = nn.Parameter(torch.ones(c.hidden_size))
        # [2, intermediate, hidden]: gate and up, viewed as the runtime's fused [2·intermediate, hidden]
        self.gate_up = nn.Parameter(torch.stack([parts["gate"].weight.detach(), parts["up"].weight.detach()]))
        self.down = nn.Parameter(parts["down"].weight.detach())

    def weights(self) -> LayerWeights:
        """The layer as the runtime's `LayerWeights` (views of the parameters: gradients reach them)."""
        return LayerWeights(self.input_norm, TrainableLinear(self.qkv, self.qkv_bias), TrainableLinear(self.o, None),
                            self.post_norm, TrainableLinear(self.gate_up.flatten(0, 1), None),
                            TrainableLinear(self.down, None))


def decoder_layer(h: torch.Tensor, lw: LayerWeights, c: ModelConfig, rope: tuple[torch.Tensor, torch.Tensor],
                  attend: Attend) -> torch.Tensor:
    """One Llama decoder layer over h [N, hidden], the runtime's math; `attend` says where the keys live."""
    h = h + attention_branch(h, lw, c, rope, attend)
    return h + mlp_branch(h, lw, c)


class DGFHead(nn.Module):
    """The trainable head. Its parameters are the DGF weights and the m layers; the embedding, final norm and LM
    head are the target's (read from `target.weights`, never trained, never saved with the head)."""

    def __init__(self, target: Transformer, layers: int = 1, dtype: torch.dtype = torch.float32):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a DGF head needs at least 1 decoder layer, got {layers}")
        c = self.config = replace(target.config, num_layers=layers)  # the target's layer shape, m layers
        hidden = c.hidden_size
        self.target = target  # a plain attribute: not a submodule, so its weights stay out of state_dict
        self.embed_norm = nn.Parameter(torch.ones(hidden))
        self.w1 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(hidden, hidden)))
        self.w2 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(hidden, hidden)))
        self.wz = nn.Parameter(nn.init.xavier_uniform_(torch.empty(2 * hidden, hidden)))
        self.layers = nn.ModuleList(HeadLayer(c, first=i == 0) for i in range(layers))
        self.rotary = Rotary(c, c.max_position, target.device)
        self._head_t: torch.Tensor | None = None  # [hidden, vocab] fp32 LM head for training (autograd)
        self.to(device=target.device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.w1.dtype

    def new_cache(self, num_slots: int, capacity: int) -> KVCache:
        return KVCache.allocate(self.config, num_slots, min(capacity, self.config.max_position), self.dtype,
                                self.target.device)

    def fuse(self, features: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """DGF: features f [N, hidden], tokens x [N] -> h [N, hidden]; z gates, per channel, how much of the
        target's feature against the token's embedding goes into the layers."""
        e = self.target.weights.embed[token_ids].to(self.dtype)  # frozen: no gradient reaches the embedding
        h1 = features.to(self.dtype) @ self.w1
        h2 = F.silu(rms_norm(e, self.embed_norm, self.config.rms_norm_eps) @ self.w2)
        z = torch.sigmoid(torch.cat([h1, h2], dim=-1) @ self.wz)
        return z * h1 + (1 - z) * h2

    def forward(self, features: torch.Tensor, token_ids: torch.Tensor, batch: ForwardBatch | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Pairs (f_j, x_{j+1}) -> predicted next features f̂_{j+1} [N, hidden].

        With a cache: the rows of `batch` (pair j at RoPE position j), K/V written at each sequence's cache
        length, which then advances. Without: one sequence from position 0, causal, nothing kept (training)."""
        h = self.fuse(features, token_ids)
        if cache is None:
            positions, attend = torch.arange(h.shape[0], device=h.device), lambda index: _causal
        else:
            assert batch is not None
            positions, attend = batch.positions, self._cached_attention(batch, cache)
        rope = self.rotary.tables(positions, self.dtype)
        for index, layer in enumerate(self.layers):
            h = decoder_layer(h, layer.weights(), self.config, rope, attend(index))
        if cache is not None:
            for slot, rows in zip(batch.slots, batch.num_rows):
                cache.advance(slot, rows)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Drafting: the target's own final norm + LM head kernel on predicted features: [N, vocab] fp32."""
        return self.target.logits(h.to(self.target.dtype))

    def train_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Training: the same map in fp32 plain torch, so gradients flow into h (the weights stay frozen)."""
        if self._head_t is None:  # the kernel's weights as [hidden, vocab], read once through its reference
            eye = torch.eye(self.config.hidden_size, device=self.target.device)
            self._head_t = self.target.weights.head.reference(eye).detach()
        norm = self.target.weights.norm.float()
        return rms_norm(h.float(), norm, self.config.rms_norm_eps) @ self._head_t

    def _cached_attention(self, batch: ForwardBatch, cache: KVCache) -> Callable[[int], Attend]:
        """Per layer index, attention of the batch's rows over their sequences' cached pairs (written first)."""
        return cached_attention(batch, cache, self.config.head_dim ** -0.5, self.target.device)


def cached_attention(batch: ForwardBatch, cache: KVCache, scale: float,
                     device: torch.device) -> Callable[[int], Attend]:
    """Layer index -> an `Attend` that writes the rows' K/V at their sequences' cache lengths, then attends over
    exactly the keys each row may see (`ExactPlan`)."""
    starts = [cache.lengths[s] for s in batch.slots]
    plan = ExactPlan.build(batch, starts, None, cache.capacity, device)

    def layer(index: int) -> Attend:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            for slot, start, kb, vb in zip(batch.slots, starts, k.split(batch.num_rows), v.split(batch.num_rows)):
                cache.write(index, slot, start, kb, vb)  # write first: every query reads its keys from the cache
            return plan.attend(q, *cache.layer(index), scale)
        return attend
    return layer


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over one whole sequence (training): [N, heads, hd] from [N, kv_heads, hd] keys."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(0, 1)


# -- the head file: weights in safetensors, its shape as JSON in the header's metadata (no pickle) ---------------

def head_shape(head_or_config: DGFHead | ModelConfig) -> dict:
    c = head_or_config.config if isinstance(head_or_config, DGFHead) else head_or_config
    return {"layers": c.num_layers} | {name: getattr(c, name) for name in SHAPE_FIELDS}


def save_head(head: DGFHead, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"format": HEAD_FORMAT, "config": json.dumps(head_shape(head)),
                                          "dtype": str(head.dtype).removeprefix("torch.")})
    return path


def load_head(path: str | Path, target: Transformer) -> DGFHead:
    """A head written by `save_head` (`outrider train-dgf`), bound to the target it was trained for."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"draft head {path} does not exist; train one with `outrider train-dgf --out {path}`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != HEAD_FORMAT:
            raise ValueError(f"{path} is not a Dovetail draft head of this version (metadata format "
                             f"{meta.get('format')!r}, want {HEAD_FORMAT!r}); write one with `outrider train-dgf`")
        state = {name: f.get_tensor(name) for name in f.keys()}
    shape = json.loads(meta["config"])
    want = head_shape(replace(target.config, num_layers=shape["layers"]))
    if shape != want:
        diff = {k: (shape.get(k), want[k]) for k in want if shape.get(k) != want[k]}
        raise ValueError(f"draft head {path} was trained for another target: (head, target) differ in {diff}; "
                         "train a head for this target with `outrider train-dgf --target ...`")
    head = DGFHead(target, shape["layers"], getattr(torch, meta.get("dtype", "float32")))
    head.load_state_dict(state, strict=True)
    return head.eval().requires_grad_(False)


# -- drafting ------------------------------------------------------------------------------------------------------

class FeatureDrafter(CachedSequences):
    """Drafts a chain of k with a `DGFHead`, all sequences batched per step.

    Like `ModelDrafter` it syncs to the committed tokens each round: the head cache keeps the pairs built from
    target features that still match the committed tokens, drops the rest (rejected drafts' positions, and the
    pairs of the last proposal, built from the head's own predicted features), and feeds the new pairs, at
    least the last one, whose output drafts d_1."""

    def __init__(self, head: DGFHead, features: FeatureSource, num_slots: int = 1, capacity: int = 4096,
                 prefill_chunk: int = 256):
        self.head = head
        self.features = features  # the target's record: each request's features by its target slot
        self.cache = head.new_cache(num_slots, capacity)
        self.prefill_chunk = prefill_chunk
        self.seqs: dict[int, DraftSeq] = {}  # fed: x_{j+1} of the pairs in the head cache built from target features
        self.retained: dict[int, list[int]] = {}

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        self._seq(seq_id)  # the prompt's features do not exist yet: the first proposal feeds its pairs

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        # a sequence needs one pair (a scored position) before it can draft: a 1-token prompt waits a round
        live = [r for r in requests if r.k > 0 and len(self.features.features(r.target_slot)) > 0]
        tokens: dict[int, list[int]] = {r.seq_id: [] for r in requests}
        probs: dict[int, list[torch.Tensor]] = {r.seq_id: [] for r in requests}
        if live:
            with torch.no_grad():
                feats = self._sync(live)  # [B, hidden] f̂ after each sequence's pending token
                for step in range(max(r.k for r in live)):
                    if step:
                        keep = [i for i, r in enumerate(live) if r.k > step]
                        live, feats = [live[i] for i in keep], feats[keep]
                        feats = self._feed(live, list(feats[:, None]), [[tokens[r.seq_id][-1]] for r in live])
                    for r, row in zip(live, self.head.logits(feats)):
                        if r.params.greedy:  # q is a point mass: no distribution to keep
                            tokens[r.seq_id].append(int(argmax(row)))  # host sync: the next step's input
                            continue
                        q = warp(row[None], r.params)[0]
                        tokens[r.seq_id].append(int(sample(q[None], r.generator)[0]))  # host sync
                        probs[r.seq_id].append(q)
        return [Draft(tokens[r.seq_id], torch.stack(probs[r.seq_id]) if probs[r.seq_id] else None)
                for r in requests]

    def _sync(self, requests: list[DraftRequest]) -> torch.Tensor:
        """Roll each head cache back to the pairs still committed, feed the new ones; [B, hidden] last outputs.

        Example: tokens [a b c d e] (e pending), features f_0..f_3; pairs (f_0,b) (f_1,c) (f_2,d) (f_3,e).
        Last round fed (f_0,b) (f_1,c) and drafted from (f̂_2,x) with x rejected: fed = [b c] matches tokens[1:3],
        so keep 2, truncate the head cache to 2 and feed (f_2,d) (f_3,e); the output at (f_3,e) drafts d_1."""
        feats, pairs = [], []
        for r in requests:
            n = len(r.tokens) - 1
            features = self.features.features(r.target_slot)
            assert len(features) == n, "FeatureDrafter drafts from the last scored position (no window ahead)"
            seq = self._seq(r.seq_id)
            keep = min(common_prefix(seq.fed, r.tokens[1:]), n - 1)  # re-feed >= 1 pair: its output is d_1's
            seq.fed = seq.fed[:keep]
            self.cache.truncate(seq.slot, keep)
            feats.append(features[keep:n])
            pairs.append(r.tokens[keep + 1:])
            seq.fed += pairs[-1]
        while max(len(p) for p in pairs) > self.prefill_chunk:  # a long prompt: bounded chunks first
            chunk = [p[:self.prefill_chunk] if len(p) > self.prefill_chunk else [] for p in pairs]
            self._feed(requests, feats, chunk)
            feats = [f[len(c):] for f, c in zip(feats, chunk)]
            pairs = [p[len(c):] for p, c in zip(pairs, chunk)]
        return self._feed(requests, feats, pairs)

    def _feed(self, requests: list[DraftRequest], feats: list[torch.Tensor],
              token_lists: list[list[int]]) -> torch.Tensor:
        """One head forward over each request's pairs (features [rows_b, hidden], tokens); the requests without
        rows this time are skipped. Returns the output after each fed request's last pair: [B', hidden]."""
        active = [(r, f[:len(t)], t) for r, f, t in zip(requests, feats, token_lists) if t]
        slots = [self.seqs[r.seq_id].slot for r, _, _ in active]
        batch = ForwardBatch.chain(slots, [t for _, _, t in active], [self.cache.lengths[s] for s in slots],
                                   self.head.target.device)
        h = self.head(torch.cat([f for _, f, _ in active]), batch.token_ids, batch, self.cache)
        return h[batch.last_rows()]
