"""`outrider bench overlap`: does drafting in an actor really overlap the target's verify on this machine?

Overlapped rounds (the next draft during this verify) cost max(draft, verify) instead of their sum only if
the two run at full speed side by side.
This times, on the real models, a draft block in the draft actor alone, a verify of k + 1 rows in this process
alone, and both started together (the draft sent first, as an overlapped round does), and prints the timeline:
when each finished, and how much slower each ran for sharing the machine (cores, memory bandwidth).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def add_overlap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlap-iters", type=int, default=10, help="overlap: timed repetitions per phase")


def run_overlap_bench(a: argparse.Namespace) -> int:
    from outrider.flags import DRAFT_K, profile_from_args, strategy_options
    from outrider.methods import DEFAULT
    from outrider.pipeline import Pipeline
    from outrider.scheduler.drafters import DraftRequest, start_proposals
    from outrider.scheduler.sampling import SamplingParams
    from outrider.scheduler.target import LocalTarget

    a.draft_actor, a.max_seq_len = True, 1024  # the draft in its actor: what is measured here
    pipe = Pipeline.load(profile_from_args(a, strategy_options(a, DEFAULT, strict=False)))
    drafter, k = pipe.engine(DEFAULT).drafter, a.draft_k or DRAFT_K
    context = pipe.encode("Write a Python function that merges two sorted lists.", chat=True)
    drafter.prefill(0, context[:-1])
    target = LocalTarget(pipe.target, 1, 1024)
    slot = target.acquire()
    target.prefill(slot, context[:-1])

    def draft() -> object:  # k + 1 tokens: the block of an overlapped round
        return start_proposals(drafter, [DraftRequest(0, context, k + 1, SamplingParams(), None)])

    def verify() -> None:
        target.score([slot], [context[-(k + 1):]])
        target.truncate(slot, len(context) - 1)

    rows: dict[str, list[float]] = {"draft alone": [], "verify alone": [], "together: verify": [],
                                    "together: draft done": []}
    for _ in range(a.overlap_iters + 1):  # the first repetition warms up and is dropped
        t0 = time.perf_counter()
        draft()()
        t1 = time.perf_counter()
        verify()
        t2 = time.perf_counter()
        collect = draft()
        verify()
        t3 = time.perf_counter()
        collect()
        t4 = time.perf_counter()
        for name, value in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t2)):
            rows[name].append(value * 1e3)
    report = {name: round(statistics.median(v[1:]), 1) for name, v in rows.items()}
    report |= {"sequential (draft + verify)": round(report["draft alone"] + report["verify alone"], 1),
               "overlapped round (max of the two, together)": round(max(report["together: verify"],
                                                                         report["together: draft done"]), 1),
               "k": k, "iters": a.overlap_iters}
    for name, value in report.items():
        print(f"{name:45} {value}{'' if name in ('k', 'iters') else ' ms'}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1) + "\n")
    return 0
