"""`outrider bench`: every strategy on the same prompts in one session, checked for greedy equality, summarised
against the analytic speedup bound, optionally beside peer runtimes (HF transformers, llama.cpp)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from outrider.bench.report import BASELINE, first_difference, plot_throughput, render_table, summarize
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.strategies import STRATEGIES, get_strategy

DEFAULT_STRATEGIES = "autoregressive,vanilla,prompt-lookup"
PEER_NAMES = ("hf", "llama.cpp")
WARMUP_TOKENS = 8  # enough to touch prefill, draft, verify and commit once; short so it costs little
_RUN_FIELDS = ("prefill_seconds", "rounds", "draft_tokens", "accepted_tokens", "accepted_per_position",
               "drafted_per_position", "draft_seconds", "verify_seconds")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help=f"comma-separated, from {', '.join(STRATEGIES)}; {BASELINE} is always run as the baseline")
    p.add_argument("--prompts", default="code-heldout", help="a built-in prompt set name or a file of prompts")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--peers", default="", help=f"comma-separated peer runtimes to run too: {', '.join(PEER_NAMES)}")
    p.add_argument("--llama-cpp", default=None, help="llama.cpp build or install folder (for --peers llama.cpp)")
    p.add_argument("--json-out", default=None, help="write config, runs, summary and peers as JSON here")
    p.add_argument("--plot", default=None, help="bar chart PNG (default: beside --json-out, else none)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="one untimed short generation per strategy before measuring")


def parse_strategies(text: str) -> list[str]:
    """Validated, de-duplicated strategy names with the baseline present (first if it was missing)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        get_strategy(name)  # raises ValueError naming the choices
    return names if BASELINE in names else [BASELINE, *names]


def parse_peers(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    bad = [n for n in names if n not in PEER_NAMES]
    if bad:
        raise ValueError(f"unknown peer(s) {', '.join(bad)}; --peers takes a comma-separated subset of "
                         f"{', '.join(PEER_NAMES)}")
    return names


def plot_path(a: argparse.Namespace) -> Path | None:
    if a.plot:
        return Path(a.plot)
    return Path(a.json_out).with_suffix(".png") if a.json_out else None


@dataclass(frozen=True)
class Workload:
    """What every strategy is measured on: the same encoded prompts, budget and sampling."""

    strategies: list[str]
    prompt_ids: list[list[int]]
    max_tokens: int
    params: SamplingParams
    ignore_eos: bool


def warm_up(pipe, work: Workload) -> None:
    """Build each engine and run it once untimed, so one-off costs (allocation, kernel selection, page faults of
    mapped weights) do not land in whichever strategy happens to run first."""
    for name in work.strategies:
        pipe.generate(work.prompt_ids[0], name, min(WARMUP_TOKENS, work.max_tokens), work.params, work.ignore_eos)


def measure(pipe, work: Workload) -> list[dict]:
    """For each prompt, every strategy back to back: interleaving spreads machine noise (thermal, other tenants)
    over all strategies instead of biasing whichever ran during a slow minute."""
    runs = []
    with tqdm(total=len(work.prompt_ids) * len(work.strategies), desc="bench", unit="run", file=sys.stderr) as bar:
        for index, ids in enumerate(work.prompt_ids):
            for name in work.strategies:
                bar.set_postfix_str(f"prompt {index} {name}")
                result = pipe.generate(ids, name, work.max_tokens, work.params, work.ignore_eos)
                runs.append(run_record(name, index, len(ids), result))
                bar.update()
    return runs


def run_record(strategy: str, prompt_index: int, prompt_tokens: int, result) -> dict:
    stats = result.as_json()["stats"]
    return {"strategy": strategy, "prompt_index": prompt_index, "prompt_tokens": prompt_tokens,
            "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "new_tokens": stats["new_tokens"], "seconds": result.seconds,
            "tokens_per_s": stats["tokens_per_s"], "mean_acceptance_length": stats["mean_acceptance_length"],
            **{k: stats[k] for k in _RUN_FIELDS}}


def greedy_mismatches(runs: list[dict], strategy: str) -> list[dict]:
    """Prompts on which `strategy`'s tokens differ from the baseline's (meaningful only at T = 0)."""
    base = {r["prompt_index"]: r["token_ids"] for r in runs if r["strategy"] == BASELINE}
    return [{"prompt_index": r["prompt_index"], "first_difference": first_difference(r["token_ids"],
                                                                                      base[r["prompt_index"]])}
            for r in runs if r["strategy"] == strategy and r["token_ids"] != base[r["prompt_index"]]]


def summarize_runs(runs: list[dict], work: Workload, k: int) -> dict[str, dict]:
    def of(name: str) -> list[dict]:
        return [r for r in runs if r["strategy"] == name]

    base = summarize(BASELINE, True, of(BASELINE), k, None, None)
    baseline_tps = base.tokens_per_s or None
    return {name: summarize(name, get_strategy(name).lossless, of(name), k, baseline_tps,
                            greedy_mismatches(runs, name) if work.params.greedy else None).as_json()
            for name in work.strategies}


def lossless_violations(summary: dict[str, dict]) -> list[str]:
    return [name for name, s in summary.items() if s["lossless"] and s["greedy_mismatches"]]


def run_bench(args: argparse.Namespace) -> int:
    from outrider.bench.prompts import load_prompts
    from outrider.cli import model_options, sampling_params
    from outrider.pipeline import Pipeline

    strategies, peers = parse_strategies(args.strategies), parse_peers(args.peers)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    prompts = load_prompts(args.prompts, args.limit)
    if not prompts:
        raise ValueError(f"prompt set {args.prompts!r} holds no prompts")
    options = model_options(args)
    pipe = Pipeline.load(options, need_draft=any(get_strategy(s).needs_draft_model for s in strategies))
    work = Workload(strategies, [pipe.encode(p.text, p.chat) for p in prompts], args.max_tokens,
                    sampling_params(args), args.ignore_eos)
    if args.warmup:
        warm_up(pipe, work)
    runs = measure(pipe, work)
    summary = summarize_runs(runs, work, options.k)
    peer_results = run_peers(peers, args, prompts) if peers else {}
    print(render_table(summary, peer_results, len(prompts)))
    report = {"config": bench_config(args, strategies, peers, pipe.load_seconds), "runs": runs,
              "summary": summary, "peers": peer_results}
    write_outputs(report, args)
    violations = lossless_violations(summary)
    if violations:
        print(f"outrider bench: lossless strategies changed greedy output: {', '.join(violations)}",
              file=sys.stderr)
    return 1 if violations else 0


def bench_config(args: argparse.Namespace, strategies: list[str], peers: list[str], load_seconds: float) -> dict:
    config = {k: v for k, v in vars(args).items() if k != "func"}
    return config | {"strategies": strategies, "peers": peers, "load_seconds": round(load_seconds, 3)}


def write_outputs(report: dict, args: argparse.Namespace) -> None:
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1), encoding="utf-8")
        print(f"wrote {path}")
    png = plot_path(args)
    if png is not None:
        cfg = report["config"]
        title = (f"{Path(str(cfg['target'])).name} (draft {Path(str(cfg['draft'])).name}), "
                 f"{len(report['runs']) // len(cfg['strategies'])} prompts, {cfg['max_tokens']} tokens, "
                 f"T={cfg['temperature']}")
        print(f"wrote {plot_throughput(report['summary'], report['peers'], png, title)}")
