"""Train a Dovetail DGF draft head (`outrider train-dgf`) by self-distillation, the recipe of EAGLE (Li et al.,
"EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", ICML 2024) that Dovetail trains with:
the target generates greedily on a prompt set, its last-layer hidden states along those sequences are the
features, and the head learns to predict the next feature and the target's next-token distribution.

    loss = SmoothL1(f̂_{j+1}, f_{j+1}) + 0.1 · CE(softmax(target logits at j+1), head logits)

AdamW (betas 0.9 / 0.95), uniform noise on the input features, gradient values clipped at 0.5; the embedding,
final norm and LM head are the target's and stay frozen. One sequence per step.
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from outrider.hub import DEFAULT_TARGET
from outrider.kernels.linear import WEIGHT_CHOICES
from outrider.methods.dovetail.head import DGFHead, save_head
from outrider.prompts import load_prompts
from outrider.runtime.loading import load_model
from outrider.runtime.model import Transformer
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import MAX_DRAFT
from outrider.scheduler.target import LocalTarget

THREADS = 2  # the target generates the training data at the thread count it serves with (its logits' bits)


@dataclass(frozen=True)
class Sample:
    tokens: torch.Tensor  # [T] int64: a prompt and the target's greedy continuation
    features: torch.Tensor  # [T, hidden] fp32: the target's last-layer hidden state at each position


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    lr: float = 3e-4  # Dovetail trains 800k steps at 3e-5; a short CPU run needs a larger step
    noise: float = 0.2  # input features get U(-noise/2, noise/2) added (EAGLE's uniform feature noise)
    ce_weight: float = 0.1
    clip: float = 0.5  # gradient value clipping, as EAGLE / Dovetail
    seed: int = 0  # sample order and noise

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.noise < 0:
            raise ValueError(f"need steps >= 1, lr > 0 and noise >= 0; got {self.steps}, {self.lr}, {self.noise}")


def collect(target: Transformer, prompts: list[list[int]], max_tokens: int,
            stop_ids: frozenset[int] = frozenset()) -> list[Sample]:
    """The target's greedy generation on each prompt, then its features along the whole sequence."""
    capacity = min(max(len(p) for p in prompts) + max_tokens + MAX_DRAFT + 2, target.max_positions)
    engine = Engine(LocalTarget(target, 1, capacity))
    recorder = LocalTarget(target, 1, capacity)
    recorder.record_features()
    samples = []
    for prompt in prompts:
        tokens = engine.generate(Request(prompt, max_tokens, stop_ids=stop_ids)).tokens
        slot = recorder.acquire()
        recorder.prefill(slot, tokens)
        samples.append(Sample(torch.tensor(tokens), recorder.features(slot).float().clone()))
        recorder.release(slot)
    return samples


def new_head(target: Transformer, layers: int, seed: int) -> DGFHead:
    """An untrained head, its initial weights drawn from `seed` (without touching the global generator)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DGFHead(target, layers)


def sample_loss(head: DGFHead, s: Sample, noise: float, ce_weight: float,
                gen: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """The loss over one sequence's pairs (f_j, x_{j+1}), j = 0..T-2, and its two terms (floats, for logs)."""
    inputs = s.features[:-1]
    inputs = inputs + (torch.rand(inputs.shape, generator=gen) - 0.5) * noise
    predicted = head(inputs, s.tokens[1:])  # [T-1, hidden] f̂_{j+1}
    want = s.features[1:]
    feature = F.smooth_l1_loss(predicted, want)
    with torch.no_grad():
        p = head.logits(want).softmax(-1)  # the target's own next-token distribution there
    ce = -(p * head.train_logits(predicted).log_softmax(-1)).sum(-1).mean()
    return feature + ce_weight * ce, feature.item(), ce.item()


def train(head: DGFHead, samples: list[Sample], config: TrainConfig) -> list[float]:
    """Train in place; returns the loss of every step."""
    usable = [s for s in samples if len(s.tokens) >= 2]
    if not usable:
        raise ValueError("no training sequence has two tokens; give longer prompts or more --max-tokens")
    head.train().requires_grad_(True)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95))
    gen, order = torch.Generator().manual_seed(config.seed), random.Random(config.seed)
    losses, queue = [], []
    for _ in range(config.steps):
        if not queue:  # a fresh shuffled pass over the sequences
            queue = order.sample(usable, len(usable))
        loss, _, _ = sample_loss(head, queue.pop(), config.noise, config.ce_weight, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, config.clip)
        opt.step()
        losses.append(loss.item())
    head.eval().requires_grad_(False)
    return losses


# -- `outrider train-dgf` ------------------------------------------------------------------------------------------

def register_cli(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-dgf", help="train a Dovetail DGF draft head on the target's own generations")
    t.add_argument("--target", default=DEFAULT_TARGET, help="built-in name, HF folder or .gguf file")
    t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    t.add_argument("--target-weights", default="auto", choices=WEIGHT_CHOICES,
                   help="the target's format while generating the data (train on the format you serve)")
    t.add_argument("--max-seq-len", type=int, default=4096)
    t.add_argument("--prompts", default="code", help="prompt set (or file) the target generates on")
    t.add_argument("--limit", type=int, default=None, help="first N prompts of the set")
    t.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    t.add_argument("--layers", type=int, default=1, help="decoder layers m of the head (Dovetail ships 5)")
    t.add_argument("--steps", type=int, default=TrainConfig.steps)
    t.add_argument("--lr", type=float, default=TrainConfig.lr)
    t.add_argument("--noise", type=float, default=TrainConfig.noise)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    t.set_defaults(func=cmd_train_dgf)


def cmd_train_dgf(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    config = TrainConfig(a.steps, a.lr, a.noise, seed=a.seed)
    torch.set_num_threads(THREADS)
    target, ckpt = load_model(a.target, a.dtype, a.target_weights, "cpu", a.max_seq_len)
    tokenizer = Tokenizer.load(ckpt.tokenizer_source)
    prompts = [tokenizer.encode(tokenizer.render(p.text, p.chat)) for p in load_prompts(a.prompts, a.limit)]
    stop = frozenset(tokenizer.eos_token_ids)
    samples = [s for p in tqdm(prompts, desc="target generations", unit="prompt", file=sys.stderr)
               for s in collect(target, [p], a.max_tokens, stop)]
    head = new_head(target, a.layers, a.seed)
    losses = train(head, samples, config)
    save_head(head, a.out)
    tenth = max(1, len(losses) // 10)
    print(f"{a.out}: {a.layers}-layer DGF head, {config.steps} steps on {len(samples)} sequences "
          f"({sum(len(s.tokens) for s in samples)} tokens); mean loss {sum(losses[:tenth]) / tenth:.4f} (first "
          f"tenth) -> {sum(losses[-tenth:]) / tenth:.4f} (last tenth)")
    return 0
