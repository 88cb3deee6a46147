"""`outrider bench transport`: what one round costs in transport alone, for each way the scheduler can reach an
actor: a plain actor call, a Ray Compiled Graph, and logits over the gloo link. No model runs: the actor returns
a fixed [rows, vocab] bf16 logits block, so the figures are pure per-round overhead."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from outrider.bench.timing import call_times_ms


class LogitsEcho:
    """An actor holding a logits block of the target's shape, answering like a target's score call."""

    def __init__(self, rows: int, vocab: int):
        self.logits = torch.randn(rows, vocab).bfloat16().view(torch.int16).numpy()

    def noop(self, tokens) -> int:
        return 0

    def score(self, tokens) -> np.ndarray:
        return self.logits

    def join_link(self, url: str) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=url, rank=1, world_size=2)

    def score_to_link(self, slots, token_lists, hidden=None, trees=None) -> None:
        import torch.distributed as dist

        dist.send(torch.from_numpy(self.logits), dst=0)


def add_transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="4,64", help="logits rows per round (k+1 for one sequence; 16 sequences × 4)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5: 151,936)")
    p.add_argument("--iters", type=int, default=100)


def run_transport_bench(args: argparse.Namespace) -> int:
    from outrider.actors.placement import connect

    connect()
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        results += _measure(rows, args.vocab, args.iters)
    print(f"{'path':34} {'rows':>5} {'ms/round p50':>13} {'mean':>8}")
    for r in results:
        print(f"{r['path']:34} {r['rows']:>5} {r['p50_ms']:>13.3f} {r['mean_ms']:>8.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json_out}")
    return 0


def _measure(rows: int, vocab: int, iters: int) -> list[dict]:
    import ray
    from ray.dag import InputNode

    from outrider.actors.transport import GlooLink

    actor = ray.remote(LogitsEcho).options(num_cpus=0).remote(rows, vocab)
    tokens = [[1, 2, 3, 4]]
    out = [_timed("actor call, empty reply", rows, iters, lambda: ray.get(actor.noop.remote(tokens))),
           _timed("actor call, logits via object store", rows, iters, lambda: ray.get(actor.score.remote(tokens)))]
    for method in ("noop", "score"):
        with InputNode() as inp:
            dag = getattr(actor, method).bind(inp)
        graph = dag.experimental_compile()
        label = "compiled graph, " + ("empty reply" if method == "noop" else "logits via channel")
        out.append(_timed(label, rows, iters, lambda: ray.get(graph.execute(tokens))))
        graph.teardown()
    link = GlooLink(actor, vocab, torch.bfloat16)
    try:
        out.append(_timed("actor call + logits over gloo", rows, iters, lambda: link.score([0], [[0] * rows], None)))
    finally:
        link.close()
    ray.kill(actor)
    return out


def _timed(path: str, rows: int, iters: int, fn) -> dict:
    times = call_times_ms(fn, iters)
    return {"path": path, "rows": rows, "p50_ms": statistics.median(times), "mean_ms": statistics.fmean(times)}
