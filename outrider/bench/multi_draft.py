"""`outrider bench multi-draft`: how close each multi-draft verifier comes to the best acceptance possible.

The target samples continuations of the prompts at the given temperature; at every position met there, the target
and draft distributions after warping (p, q) give, for each way of drawing n drafts and each n, the optimal
acceptance α* (the transport bound, `methods.multi_draft.bound`) and the acceptance its verifier reaches: the
exact probability that the verifier outputs one of the drafts, averaged over `--verifier-draws` draws of them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from outrider.bench.report import new_figure, save_figure
from outrider.methods import BASELINE
from outrider.methods.multi_draft import METHOD
from outrider.methods.multi_draft.bound import Support, optimal_on, restrict
from outrider.methods.multi_draft.schemes import SCHEMES, VERIFIERS
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.model import Transformer
from outrider.scheduler.sampling import SamplingParams, warp

MODE = METHOD.name  # the bench mode's name: the method it measures


def add_multi_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-drafts", default="1,2,3,4", help=f"{MODE}: drafts per position to bound, comma-separated")
    p.add_argument("--bound-positions", type=int, default=256,
                   help=f"{MODE}: positions evaluated, spread evenly over the sampled continuations")
    p.add_argument("--verifier-draws", type=int, default=32, help=f"{MODE}: draft draws per position and verifier")
    p.add_argument("--bound-support", type=int, default=512,
                   help=f"{MODE}: the draft's most probable tokens kept (the rest bounds the error, reported)")


def position_distributions(target: Transformer, draft: Transformer, kept_ids: torch.Tensor | None,
                           ids: list[int], generated: list[int], params: SamplingParams) -> list[tuple]:
    """(p, q) as float64 numpy rows at each generated token's position: both models read prompt + continuation."""
    tokens = ids + generated
    rows = []
    for model in (target, draft):
        cache = model.new_cache(1, len(tokens) + 1)
        batch = ForwardBatch.chain([0], [tokens], [0], model.device)
        at = torch.arange(len(ids) - 1, len(tokens) - 1)
        logits = model.forward(batch, cache, logits_rows=at).logits
        probs = warp(logits, params).double()
        if model is draft and kept_ids is not None:
            probs = probs.new_zeros(len(at), target.config.vocab_size).index_copy_(1, kept_ids, probs)
        rows.append(probs.numpy())
    return list(zip(rows[0], rows[1]))


def achieved(cut: Support, n: int, sampling: str, draws: int, generator: torch.Generator) -> float:
    """The verifier's mean P(output ∈ drafts) over `draws` draft draws, on q's support (p outside lumped in one
    token the draft never proposes, which leaves every rule's outcome the same)."""
    p_l = torch.tensor(np.append(cut.p, max(0.0, 1.0 - cut.p.sum())))
    q_l = torch.tensor(np.append(cut.q, 0.0))
    scheme, rule = SCHEMES[sampling], VERIFIERS[SCHEMES[sampling].verifier]
    total = 0.0
    for _ in range(draws):
        drafts = scheme.draw(q_l, n, generator)
        total += float(rule(p_l, q_l, drafts).child_probs.sum())
    return total / draws


def run_multi_draft_bench(a: argparse.Namespace) -> int:
    from outrider.flags import profile_from_args, strategy_options
    from outrider.pipeline import Pipeline
    from outrider.prompts import load_prompts

    ns = sorted({int(x) for x in a.n_drafts.split(",") if x.strip()})
    if not ns or min(ns) < 1:
        raise ValueError(f"--n-drafts takes positive counts, got {a.n_drafts!r}")
    if a.temperature <= 0:
        raise ValueError("bench multi-draft measures sampled decoding: give --temperature > 0")
    params = SamplingParams(a.temperature, a.top_k, a.top_p, a.seed if a.seed is not None else 0)
    prompts = load_prompts(a.prompts, a.limit)
    options = [strategy_options(a, BASELINE, strict=False), strategy_options(a, MODE, strict=False)]
    pipe = Pipeline.load(profile_from_args(a, options[1]), options)
    host = pipe.deployment.draft
    if host is None or not hasattr(host, "model"):
        raise ValueError("bench multi-draft reads the draft model's distributions: run it in this process")
    positions = []
    for prompt in tqdm(prompts, desc="sampling continuations", unit="prompt"):
        ids = pipe.encode(prompt.text, prompt.chat)
        result = pipe.generate(ids, BASELINE, a.max_tokens, params, a.ignore_eos)
        positions += position_distributions(pipe.target, host.model, host.kept_ids, ids, result.token_ids, params)
    pick = np.unique(np.linspace(0, len(positions) - 1, min(a.bound_positions, len(positions))).astype(int))
    generator = torch.Generator().manual_seed(params.seed)
    table = {s: {n: {"bound": [], "verifier": [], "tail": []} for n in ns} for s in SCHEMES}
    for i in tqdm(pick, desc="bounds", unit="position"):
        cut = restrict(*positions[i], a.bound_support)  # once per position: it sorts the whole vocabulary
        for sampling in SCHEMES:
            for n in ns:
                bound = optimal_on(cut, n, sampling)
                cell = table[sampling][n]
                cell["bound"].append(bound.value)
                cell["tail"].append(bound.tail)
                cell["verifier"].append(achieved(cut, n, sampling, a.verifier_draws, generator))
    summary = {s: {str(n): {"optimal": round(float(np.mean(c["bound"])), 4),
                            "verifier": round(float(np.mean(c["verifier"])), 4),
                            "verifier_name": SCHEMES[s].verifier,
                            "max_tail": float(np.max(c["tail"]))} for n, c in cells.items()}
               for s, cells in table.items()}
    print(render(summary, ns, len(pick), params))
    report = {"config": {"prompts": a.prompts, "limit": a.limit, "max_tokens": a.max_tokens,
                         "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "seed": params.seed,
                         "positions": len(pick), "verifier_draws": a.verifier_draws, "support": a.bound_support,
                         "target": str(pipe.deployment.profile.models.target), "draft":
                         str(pipe.deployment.profile.models.draft)}, "summary": summary}
    if a.json_out:
        path = Path(a.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1), encoding="utf-8")
        print(f"wrote {path}")
        print(f"wrote {plot(summary, ns, Path(a.plot) if a.plot else path.with_suffix('.png'), params)}")
    pipe.shutdown()
    return 0


def render(summary: dict, ns: list[int], positions: int, params: SamplingParams) -> str:
    lines = [f"acceptance at one position, mean over {positions} positions (T={params.temperature}): "
             "optimal (transport bound) / the scheme's verifier / gap",
             f"{'sampling':<22}{'verifier':<26}" + "".join(f"{'n=' + str(n):>22}" for n in ns)]
    for s, cells in summary.items():
        row = "".join(f"{c['optimal']:>8.4f} / {c['verifier']:.4f} / {c['optimal'] - c['verifier']:+.3f}"
                      .rjust(22) for c in (cells[str(n)] for n in ns))
        lines.append(f"{s:<22}{SCHEMES[s].verifier:<26}{row}")
    tail = max(c["max_tail"] for cells in summary.values() for c in cells.values())
    lines.append(f"support cut moves any bound by at most {tail:.2e}")
    return "\n".join(lines)


def plot(summary: dict, ns: list[int], path: Path, params: SamplingParams) -> Path:
    fig, ax = new_figure((5.5, 4.0))
    for (s, cells), color in zip(summary.items(), ("tab:orange", "tab:blue", "tab:green")):
        ax.plot(ns, [cells[str(n)]["optimal"] for n in ns], "-o", color=color, label=f"{s}: optimal")
        ax.plot(ns, [cells[str(n)]["verifier"] for n in ns], "--x", color=color,
                label=f"{s}: {SCHEMES[s].verifier}")
    ax.set_xlabel("drafts per position (n)")
    ax.set_ylabel("P(output is a draft)")
    ax.set_xticks(ns)
    ax.set_title(f"multi-draft acceptance vs the optimal transport bound, T={params.temperature}", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
