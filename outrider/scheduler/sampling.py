"""Sampling parameters, the logits adjustments (logit_bias, penalties), the logits → probabilities warp, drawing a
token, and the log-probabilities a request reports.

`warp` is applied to the target logits (giving p) *and* to the draft logits (giving q). Verification divides
p(x) by q(x), so q must be exactly the distribution the draft token was drawn from: warp both sides with the same
function and the same parameters, and never sample from one warp while dividing by another (the acceptance
ratio of Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", §2.3, holds only
for the q the token was drawn from).

Penalties depend on the tokens before the row (`adjust` takes them): a verify row scoring the third draft token is
penalised for the first two, exactly as plain decoding would have penalised it after committing them. The order,
as vLLM's sampler: logit_bias, repetition penalty, frequency and presence penalties (`adjust`), then temperature,
top-k, softmax, min-p, top-p (`warp`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from outrider.kernels.native import available as native_available


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy (argmax; the seed is ignored)
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    seed: int | None = None  # None → the caller's (or torch's global) random stream
    min_p: float = 0.0  # keep tokens with probability ≥ min_p × the top token's; 0 → off
    # OpenAI's: subtract frequency_penalty × count and presence_penalty × [count > 0] of each token generated so far
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # vLLM's / Hugging Face's: a token already in the prompt or the output has its logit divided by this (multiplied
    # when negative); 1 → off
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); -100 bans, +100 forces

    def __post_init__(self) -> None:
        # `not x >= 0` also rejects NaN.
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2] (1 = off), got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias of token {token} must be in [-100, 100], got {bias}")

    @property
    def adjusts(self) -> bool:
        """Whether `adjust` changes logits (logit_bias or a penalty is set)."""
        return bool(self.logit_bias) or self.frequency_penalty != 0 or self.presence_penalty != 0 \
            or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with `seed`, or None (use torch's global stream) when no seed was given."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def argmax(logits: Tensor) -> Tensor:
    """logits.argmax(-1), the greedy token of each row: the first of equal maxima, NaN above all, exactly as torch
    picks it. On a CPU where our C++ ops run, fp32 rows go through `argmax_rows`: torch's CPU argmax took about
    210 us for one 151,936-wide row here and 500 us for a 4-row verify, paid by every draft step and round."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() in (1, 2) \
            and logits.shape[-1] > 0 and native_available():
        return torch.ops.outrider.argmax_rows(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape[:-1])
    return logits.argmax(-1)


def warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """[..., V] logits → [..., V] float32 probabilities after temperature, top-k and top-p.

    Greedy → one-hot at `argmax` (ties: the lowest index). Every step works on each row alone, so a
    batch of rows warps exactly like the rows one at a time.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    if params.greedy:
        return F.one_hot(argmax(logits), vocab).float()
    logits = logits / params.temperature
    if 0 < params.top_k < vocab:
        logits = _keep_top_k(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = _keep_min_p(probs, params.min_p)
    if params.top_p < 1.0:  # top_p == 1 is skipped outright: float cumsums may reach 1.0 before the tail ends
        probs = _keep_top_p(probs, params.top_p)
    return probs


def _keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Mask everything below the k-th largest logit. Ties with the k-th value are all kept, so the result
    depends on the values alone, not on how a sort orders equal entries."""
    kth = logits.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, -math.inf)


def _keep_min_p(probs: Tensor, min_p: float) -> Tensor:
    """Drop tokens less likely than min_p × the most likely one, renormalised (the top token always stays)."""
    kept = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return kept / kept.sum(-1, keepdim=True)


def _keep_top_p(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (the nucleus), renormalised.

    Sorted descending, token i is dropped iff the mass strictly before it already reaches top_p; the most likely
    token is always kept. A stable sort breaks ties by lower index, so the result is deterministic.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [..., V] each
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p  # [..., V] mass before i ≥ top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """[..., V] probabilities → [...] int64 token ids, one independent draw per row from `generator`.

    A one-hot row always yields its hot index, whatever the generator's state.
    """
    # Inverse CDF: draw u ~ U[0, 1) and take the first token whose cumulative mass exceeds u · total. Exact, and
    # 20x cheaper than torch.multinomial over a 151,936-token vocabulary (measured: 3.3 ms → 0.15 ms a row).
    # A zero-probability token repeats its predecessor's cumulative mass, so `right=True` never lands on it.
    rows = probs.reshape(-1, probs.shape[-1]).double()  # [R, V]
    cdf = rows.cumsum(-1)  # [R, V]
    u = torch.rand(rows.shape[0], 1, generator=generator, dtype=torch.float64, device=rows.device)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=rows.shape[-1] - 1)
    return picked.view(probs.shape[:-1])


def adjust(logits: Tensor, params: SamplingParams, prompt: Sequence[int], generated: Sequence[int],
           extra: Sequence[Sequence[int]] | None = None) -> Tensor:
    """[R, V] logits → [R, V] float32 logits after logit_bias and the penalties. Row r follows the prompt, the
    `generated` tokens and then `extra[r]` (the drafts before a verify row; None: nothing more, every row). Each row
    depends only on its own tokens, so a verify row equals the row plain decoding computes at that position."""
    logits = logits.float()
    if not params.adjusts:
        return logits
    rows, vocab = logits.shape
    extra = [()] * rows if extra is None else extra
    out = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=out.device)
        out[:, ids] += torch.tensor([b for _, b in params.logit_bias], dtype=out.dtype, device=out.device)
    counts = _counts(generated, extra, vocab, out.device)  # [R, V] each token's count in the row's output
    if params.repetition_penalty != 1:
        seen = counts > 0
        if prompt:
            seen[:, torch.tensor(list(prompt), dtype=torch.long, device=out.device)] = True
        penalised = torch.where(out > 0, out / params.repetition_penalty, out * params.repetition_penalty)
        out = torch.where(seen, penalised, out)
    if params.frequency_penalty:
        out -= params.frequency_penalty * counts
    if params.presence_penalty:
        out -= params.presence_penalty * (counts > 0).float()
    return out


def _counts(generated: Sequence[int], extra: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """[R, V] float32: how often each token occurs in `generated` + extra[r]."""
    base = torch.zeros(vocab, dtype=torch.float32, device=device)
    if generated:
        base.index_add_(0, torch.tensor(list(generated), dtype=torch.long, device=device),
                        torch.ones(len(generated), device=device))
    counts = base.repeat(len(extra), 1)
    for r, tokens in enumerate(extra):
        for t in tokens:
            counts[r, t] += 1
    return counts


@dataclass(frozen=True)
class TokenLogprob:
    """A committed token's log-probability under the target and the most likely alternatives at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


def log_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """[..., V] adjusted logits → log-probabilities of the distribution the request samples from, before
    truncation: log_softmax(logits / temperature). Greedy requests report the model's own distribution
    (temperature 1), what log-likelihood evaluations read. Top-k / top-p / min-p are not applied: a token they
    drop would have -inf, which JSON cannot carry."""
    return torch.log_softmax(logits.float() / (params.temperature or 1.0), dim=-1)


def token_logprobs(logits: Tensor, tokens: Sequence[int], params: SamplingParams, top: int) -> list[TokenLogprob]:
    """[n, V] adjusted logits, row i the distribution `tokens[i]` was chosen from → their `TokenLogprob`s with the
    `top` most likely alternatives (0: none)."""
    if not tokens:
        return []
    lp = log_probs(logits[:len(tokens)], params)  # [n, V]
    chosen = lp.gather(1, torch.tensor(list(tokens), dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprob(t, c) for t, c in zip(tokens, chosen)]
    values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)  # [n, top], sorted
    return [TokenLogprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]
