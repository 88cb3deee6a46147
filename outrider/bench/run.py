"""`outrider bench`: every strategy on the same prompts in one session, checked for greedy equality, summarised
against the analytic speedup bound, optionally beside peer runtimes (HF transformers, llama.cpp)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tqdm import tqdm

from outrider.bench.report import first_difference, plot_throughput, render_table, render_verify_costs, summarize
from outrider.methods import BASELINE, METHODS, get_method
from outrider.scheduler.sampling import SamplingParams

if TYPE_CHECKING:  # the pipeline pulls in the builder and the model code
    from outrider.pipeline import Pipeline, Result
    from outrider.prompts import Prompt
    from outrider.scheduler.grammar import Grammar

DEFAULT_STRATEGIES = ",".join(list(METHODS)[:3])  # the baseline, a draft model's chain, n-gram drafts
PEER_NAMES = ("hf", "llama.cpp")
WARMUP_TOKENS = 8  # enough to touch prefill, draft, verify and commit once; short so it costs little
_RUN_FIELDS = ("prefill_seconds", "rounds", "draft_tokens", "accepted_tokens", "accepted_per_position",
               "drafted_per_position", "draft_seconds", "verify_seconds")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help=f"comma-separated, from {', '.join(METHODS)}; {BASELINE} is always run as the baseline")
    p.add_argument("--prompts", default="code-heldout", help="a built-in prompt set name or a file of prompts")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--peers", default="", help=f"comma-separated peer runtimes to run too: {', '.join(PEER_NAMES)}")
    p.add_argument("--llama-cpp", default=None,
                   help="folder holding llama.cpp's binaries (llama-speculative-simple, llama-completion); "
                        "default: $OUTRIDER_HOME/llama.cpp/bin, then PATH")
    p.add_argument("--json-out", default=None, help="write config, runs, summary and peers as JSON here")
    p.add_argument("--plot", default=None, help="bar chart PNG (default: beside --json-out, else none)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="one untimed short generation per strategy before measuring")


def parse_strategies(text: str) -> list[str]:
    """Validated, de-duplicated strategy names with the baseline present (first if it was missing)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        get_method(name)  # raises ValueError naming the choices
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
    grammar: Grammar | None = None  # structured output (--json-schema)


def warm_up(pipe: Pipeline, work: Workload) -> None:
    """Build each engine and run it once untimed, so one-off costs (allocation, kernel selection, page faults of
    mapped weights) do not land in whichever strategy happens to run first."""
    for name in work.strategies:
        pipe.generate(work.prompt_ids[0], name, min(WARMUP_TOKENS, work.max_tokens), work.params, work.ignore_eos,
                      work.grammar)


def measure(pipe: Pipeline, work: Workload, after_prompt: Callable[[int], None] | None = None) -> list[dict]:
    """For each prompt, every strategy back to back: interleaving spreads machine noise (thermal, other tenants)
    over all strategies instead of biasing whichever ran during a slow minute. `after_prompt(index)` runs right
    after each prompt's strategies (llama.cpp on the same prompt, so its ratios to ours are taken minutes closer)."""
    runs = []
    with tqdm(total=len(work.prompt_ids) * len(work.strategies), desc="bench", unit="run", file=sys.stderr) as bar:
        for index, ids in enumerate(work.prompt_ids):
            for name in work.strategies:
                bar.set_postfix_str(f"prompt {index} {name}")
                result = pipe.generate(ids, name, work.max_tokens, work.params, work.ignore_eos, work.grammar)
                runs.append(run_record(name, index, len(ids), result))
                bar.update()
            if after_prompt is not None:
                after_prompt(index)
    return runs


def run_record(strategy: str, prompt_index: int, prompt_tokens: int, result: Result) -> dict:
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


def summarize_runs(runs: list[dict], work: Workload, ks: dict[str, int]) -> dict[str, dict]:
    """Per strategy: its summary against the baseline; `ks` is each strategy's configured k."""
    def of(name: str) -> list[dict]:
        return [r for r in runs if r["strategy"] == name]

    base = summarize(BASELINE, True, of(BASELINE), ks[BASELINE], None, None)
    baseline_tps = base.tokens_per_s or None
    return {name: summarize(name, get_method(name).lossless, of(name), ks[name], baseline_tps,
                            greedy_mismatches(runs, name) if work.params.greedy else None).as_json()
            for name in work.strategies}


def lossless_violations(summary: dict[str, dict]) -> list[str]:
    return [name for name, s in summary.items() if s["lossless"] and s["greedy_mismatches"]]


def run_bench(args: argparse.Namespace) -> int:
    from outrider.prompts import load_prompts

    strategies, peers = parse_strategies(args.strategies), parse_peers(args.peers)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    prompts = load_prompts(args.prompts, args.limit)
    if not prompts:
        raise ValueError(f"prompt set {args.prompts!r} holds no prompts")
    peer_plan = plan_peers(peers, args)  # before loading models: a missing peer fails in seconds, not minutes
    session = measure_outrider(args, strategies, prompts, peer_plan)
    peer_results = run_peers(peer_plan, session.prompt_texts, args, session.peer_results) if peers else {}
    print(render_table(session.summary, peer_results, len(prompts)))
    print(render_verify_costs(session.verify_cost_ms))
    report = {"config": bench_config(args, strategies, peers, session.load_seconds), "runs": session.runs,
              "summary": session.summary, "peers": peer_results, "verify_ms_by_rows": session.verify_cost_ms}
    write_outputs(report, args)
    violations = lossless_violations(session.summary)
    if violations:
        print(f"outrider bench: lossless strategies changed greedy output: {', '.join(violations)}",
              file=sys.stderr)
    return 1 if violations else 0


@dataclass
class Session:
    runs: list[dict]
    summary: dict[str, dict]
    prompt_texts: list[str]  # chat-templated where the prompt is a chat turn: exactly what the target read
    load_seconds: float
    peer_results: dict[str, dict]  # peers measured prompt by prompt between ours (llama.cpp)
    verify_cost_ms: dict[str, dict[int, float]]  # per strategy, its engine's verify timer by rows (moving average)


def measure_outrider(args: argparse.Namespace, strategies: list[str], prompts: list[Prompt],
                     peer_plan: PeerPlan | None = None) -> Session:
    """Load once, warm up, measure; the pipeline is dropped on return so the other peers get its memory.
    llama.cpp, a subprocess of its own, runs on each prompt right after our strategies do."""
    from outrider.flags import check_flags_used, profile_from_args, strategy_options
    from outrider.pipeline import Pipeline

    check_flags_used(args, strategies)
    options = [strategy_options(args, s, strict=False) for s in strategies]
    pipe = Pipeline.load(profile_from_args(args, options[0]), options)  # options[0]: the baseline
    texts = [pipe.render(p.text, p.chat) for p in prompts]
    work = Workload(strategies, [pipe.encode(p.text, p.chat) for p in prompts], args.max_tokens,
                    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed), args.ignore_eos,
                    pipe.grammar(args.json_schema))
    if args.warmup:
        warm_up(pipe, work)
    llama = _InterleavedLlamaCpp(peer_plan, texts, args) if peer_plan and "llama.cpp" in peer_plan.names else None
    runs = measure(pipe, work, llama.run if llama else None)
    peer_results = {"llama.cpp": llama.result()} if llama else {}
    summary = summarize_runs(runs, work, {o.name: o.k for o in options})
    costs = {name: {rows: round(1000 * s, 2) for rows, s in sorted(pipe.engine(name).verify_cost.seconds.items())}
             for name in strategies}
    return Session(runs, summary, texts, pipe.load_seconds, peer_results, costs)


class _InterleavedLlamaCpp:
    """llama.cpp's plain and speculative runs, one prompt at a time; a failure is recorded once and ends them."""

    def __init__(self, plan: PeerPlan, texts: list[str], args: argparse.Namespace):
        self.plan, self.texts, self.args = plan, texts, args
        self.runs: list = []
        self.error: str | None = None

    def run(self, index: int) -> None:
        from outrider.bench.peers import run_llama_cpp
        from outrider.flags import CPU_THREADS as THREADS
        from outrider.flags import DRAFT_K

        if self.error is not None:
            return
        assert self.plan.llama_cpp is not None
        try:
            runs = run_llama_cpp(self.plan.llama_cpp, self.plan.target, self.plan.draft, [self.texts[index]],
                                 self.args.max_tokens, THREADS, self.args.draft_k or DRAFT_K)
        except (RuntimeError, ValueError, OSError) as e:
            print(f"!!! peer llama.cpp failed: {e}", file=sys.stderr)
            self.error = str(e)
            return
        self.runs += [replace(r, prompt_index=index) for r in runs]

    def result(self) -> dict:
        if self.error is not None:
            return {"error": self.error, "runs": []}
        return summarize_peer([asdict(r) for r in self.runs])


@dataclass(frozen=True)
class PeerPlan:
    target: Path  # GGUF files: both peers read the very files outrider loads
    draft: Path
    llama_cpp: Path | None  # binaries folder, when llama.cpp is among the peers
    names: list[str]


def plan_peers(names: list[str], args: argparse.Namespace) -> PeerPlan | None:
    if not names:
        return None
    from outrider import hub
    from outrider.bench.peers import find_llama_cpp

    target, draft = hub.resolve(args.target), hub.resolve(args.draft)
    for role, path in (("--target", target), ("--draft", draft)):
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"--peers needs GGUF models (both peers load the same file), but {role} resolves to "
                             f"{path}; pass a built-in name or a .gguf file")
    bin_dir = None
    if "llama.cpp" in names:
        bin_dir = find_llama_cpp(Path(args.llama_cpp).expanduser() if args.llama_cpp else None)
        if bin_dir is None:
            raise ValueError("--peers llama.cpp: no llama.cpp binaries found; pass --llama-cpp DIR (the folder "
                             "holding llama-speculative-simple) or build them with `make peers`")
    return PeerPlan(target, draft, bin_dir, names)


def run_peers(plan: PeerPlan, prompt_texts: list[str], args: argparse.Namespace,
              done: dict[str, dict]) -> dict[str, dict]:
    """The peers not already measured between our runs (`done`: llama.cpp), i.e. HF, after ours: its load takes
    over a minute, too long to repeat per prompt. A peer that fails is recorded with its error rather than
    discarding the outrider measurements already taken."""
    from outrider.bench.peers import run_hf
    from outrider.flags import CPU_THREADS as THREADS

    results = dict(done)
    if "hf" in plan.names:
        print(f"outrider bench: running peer hf on {len(prompt_texts)} prompts", file=sys.stderr)
        try:
            runs = run_hf(plan.target, plan.draft, prompt_texts, args.max_tokens, args.dtype, THREADS)
            results["hf"] = summarize_peer([asdict(r) for r in runs])
        except (RuntimeError, ValueError, OSError) as e:
            print(f"!!! peer hf failed: {e}", file=sys.stderr)
            results["hf"] = {"error": str(e), "runs": []}
    return {name: results[name] for name in plan.names}


def summarize_peer(runs: list[dict]) -> dict:
    """Plain vs speculative of one peer: pooled tok/s, speedup over its own plain, and whether speculation kept
    its output (token ids where the peer exposes them, else the decoded text)."""
    systems = list(dict.fromkeys(r["system"] for r in runs))
    plain = [r for r in runs if r["system"] == systems[0]]
    spec = [r for r in runs if len(systems) > 1 and r["system"] == systems[1]]

    def tps(rs: list[dict]) -> float | None:
        seconds = sum(r["seconds"] for r in rs)
        return sum(r["new_tokens"] for r in rs) / seconds if seconds else None

    pairs = list(zip(sorted(plain, key=lambda r: r["prompt_index"]), sorted(spec, key=lambda r: r["prompt_index"])))
    by_ids = all(p["token_ids"] is not None and s["token_ids"] is not None for p, s in pairs)
    key = "token_ids" if by_ids else "text"
    plain_tps, spec_tps = tps(plain), tps(spec)
    return {"plain_system": systems[0], "spec_system": systems[1] if len(systems) > 1 else None,
            "plain_tokens_per_s": plain_tps, "spec_tokens_per_s": spec_tps,
            "speedup": spec_tps / plain_tps if plain_tps and spec_tps else None,
            "compared_by": key, "compared_runs": len(pairs) if pairs else None,
            "identical_runs": sum(_agree(p[key], s[key]) for p, s in pairs) if pairs else None,
            "differing_prompts": [p["prompt_index"] for p, s in pairs if not _agree(p[key], s[key])],
            "note": plain[0]["note"] if plain else "", "runs": runs}


def _agree(a: str | list[int], b: str | list[int]) -> bool:
    """Outputs agree when one is a prefix of the other: a peer's speculative run may overshoot the token limit
    by a few accepted drafts (llama-speculative-simple does), which is not a difference in what it generated."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


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
