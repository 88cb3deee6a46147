"""`outrider bench serving`: a profile served by the async scheduler, at several concurrencies, with models in
Ray actors (`ray`) and in this process (`local`), on the same prompts.

Reports tokens/s, TTFT and time per output token per concurrency, the mean round time in each mode (their
difference is the per-round cost of actors: calls, transfers, scheduling), the actors' own busy time, and
checks that every mode and concurrency produced the same greedy tokens for each prompt.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from outrider.scheduler.sampling import SamplingParams


def add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="deployment profile (default deploy/profiles/cpu.yaml)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the level)")
    p.add_argument("--modes", default="ray,local", help="ray (actors per the profile), local (in-process)")
    p.add_argument("--speculation-gate", choices=["profile", "on", "off"], default="profile",
                   help="off: every round drafts, so ray and local run the same rounds and their mean round "
                        "times compare directly")


@dataclass
class Level:
    """One concurrency level in one mode."""

    mode: str
    concurrency: int
    seconds: float
    tokens: int
    ttft: list[float]
    tpot: list[float]
    rounds: list[float] = field(default_factory=list)  # seconds of each scheduler round
    speculated_rounds: int = 0
    busy: dict[str, float] = field(default_factory=dict)  # actor busy seconds during the level
    outputs: dict[int, list[int]] = field(default_factory=dict)  # prompt index -> tokens

    def as_json(self) -> dict:
        def pct(xs: list[float], q: float) -> float | None:
            return round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 2) if xs else None

        return {"mode": self.mode, "concurrency": self.concurrency, "requests": len(self.ttft),
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 2),
                "ttft_ms_p50": pct(self.ttft, 0.5), "ttft_ms_p99": pct(self.ttft, 0.99),
                "tpot_ms_p50": pct(self.tpot, 0.5), "tpot_ms_p99": pct(self.tpot, 0.99),
                "rounds": len(self.rounds), "round_ms_mean": round(statistics.fmean(self.rounds) * 1e3, 2),
                "speculated_rounds": self.speculated_rounds,
                "actor_busy_ms_per_round": {k: round(v / len(self.rounds) * 1e3, 2) for k, v in self.busy.items()}}


def run_serving_bench(args: argparse.Namespace) -> int:
    from outrider.profile import DEFAULT_PROFILE, load_profile
    from outrider.prompts import load_prompts

    profile = load_profile(args.profile or DEFAULT_PROFILE)
    if args.speculation_gate != "profile":
        profile = profile.model_copy(update={"scheduler": profile.scheduler.model_copy(
            update={"speculation_gate": args.speculation_gate == "on"})})
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not levels or min(levels) < 1 or any(m not in ("ray", "local") for m in modes):
        raise ValueError("--concurrency takes positive integers and --modes a subset of ray,local")
    if max(levels) > profile.scheduler.max_running:
        raise ValueError(f"--concurrency {max(levels)} exceeds the profile's scheduler.max_running "
                         f"({profile.scheduler.max_running})")
    prompts = load_prompts(args.prompts, args.limit)
    results: list[Level] = []
    for mode in modes:
        results += _measure_mode(profile.model_copy(update={"placement": profile.placement.model_copy(
            update={"mode": mode})}), prompts, levels, args)
    report = {"profile": profile.model_dump(), "levels": [r.as_json() for r in results],
              "greedy_mismatches": _mismatches(results)}
    print(_table(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json_out}")
    if report["greedy_mismatches"]:
        print(f"outrider bench: outputs differ between modes/concurrencies: {report['greedy_mismatches']}",
              file=sys.stderr)
        return 1
    return 0


def _measure_mode(profile, prompts, levels: list[int], args: argparse.Namespace) -> list[Level]:
    from outrider.service import Service

    service = Service.start(profile)
    print(f"outrider bench: {profile.placement.mode} mode ready in {service.load_seconds:.1f}s", file=sys.stderr)
    try:
        ids = [service.tokenizer.encode(service.tokenizer.apply_chat_template([{"role": "user", "content": p.text}])
                                        if p.chat else p.text) for p in prompts]
        return asyncio.run(_levels(service, ids, levels, args))
    finally:
        service.shutdown()


async def _levels(service, ids: list[list[int]], levels: list[int], args) -> list[Level]:
    async with service:
        await service.complete(ids[0], 4)  # warm-up: first-call costs stay out of the figures
        return [await _level(service, ids, c, args) for c in levels]


async def _level(service, ids: list[list[int]], concurrency: int, args) -> Level:
    """Closed loop: `concurrency` clients, each sending its next request when the previous one ends."""
    n = max(args.requests, concurrency)
    todo = list(range(n))
    level = Level(service.profile.placement.mode, concurrency, 0.0, 0, [], [])
    hook = lambda report: (level.rounds.append(report.seconds),  # noqa: E731
                           setattr(level, "speculated_rounds", level.speculated_rounds + report.speculated))
    service.scheduler.after_round.append(hook)
    busy0 = _busy(service)

    async def client() -> None:
        while todo:
            i = todo.pop(0)
            c = await service.complete(ids[i % len(ids)], args.max_tokens, SamplingParams(), frozenset())
            level.tokens += len(c.token_ids)
            level.outputs[i % len(ids)] = c.token_ids
            level.ttft.append(c.ttft_s or 0.0)
            if len(c.token_ids) > 1:
                level.tpot.append((c.seconds - (c.ttft_s or 0.0)) / (len(c.token_ids) - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    level.seconds = time.perf_counter() - t0
    service.scheduler.after_round.remove(hook)
    level.busy = {k: _busy(service)[k] - busy0[k] for k in busy0}
    print(f"  {level.mode} c={concurrency}: {level.tokens / level.seconds:.2f} tok/s", file=sys.stderr)
    return level


def _busy(service) -> dict[str, float]:
    """Seconds the actors spent computing so far (ray mode only)."""
    if service.placed is None:
        return {}
    placed, out = service.placed, {}
    if placed.target is not None:
        out = {f"target{i}": info["busy_seconds"] for i, info in enumerate(placed.target.infos())}
    if placed.drafter is not None:
        out["draft"] = placed.drafter.info()["busy_seconds"]
    return out


def _mismatches(levels: list[Level]) -> list[str]:
    reference = levels[0].outputs
    return [f"{lv.mode} c={lv.concurrency} prompt {i}" for lv in levels for i, toks in lv.outputs.items()
            if i in reference and toks != reference[i]]


def _table(report: dict) -> str:
    head = (f"{'mode':6} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
            f"{'round ms':>9} {'spec rounds':>11}")
    rows = [head, "-" * len(head)]
    for lv in report["levels"]:
        rows.append(f"{lv['mode']:6} {lv['concurrency']:>4} {lv['tokens_per_s']:>8.2f} {lv['ttft_ms_p50']:>9} "
                    f"{lv['ttft_ms_p99']:>9} {lv['tpot_ms_p50']:>9} {lv['tpot_ms_p99']:>9} "
                    f"{lv['round_ms_mean']:>9} {lv['speculated_rounds']:>5}/{lv['rounds']:<5}")
    by = {(lv["mode"], lv["concurrency"]): lv for lv in report["levels"]}
    for (mode, c), lv in by.items():
        if mode == "ray" and ("local", c) in by:
            rows.append(f"actor overhead at c={c}: {lv['round_ms_mean'] - by[('local', c)]['round_ms_mean']:+.2f} "
                        f"ms per round (ray − local mean round); actor busy ms/round {lv['actor_busy_ms_per_round']}")
    rows.append(f"greedy outputs identical across modes and concurrencies: {not report['greedy_mismatches']}")
    return "\n".join(rows)
