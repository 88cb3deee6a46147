"""Prometheus metrics under vLLM's names (with the `outrider:` prefix), in a registry owned by one app.

Speculative counters come from the scheduler's `after_round` hook, per sequence per round:
  num_drafts          rounds in which the sequence drafted >= 1 token
  num_draft_tokens    draft tokens proposed
  num_accepted_tokens draft tokens accepted (not counting the bonus/recovered token the target always adds)
  accepted_tokens_per_pos{position=i}  rounds whose i-th draft token was accepted: a chain with a accepted
                      drafts accepted positions 0..a-1, so sum over positions == num_accepted_tokens.
Mean acceptance length = 1 + accepted / drafts, as vLLM derives it from the same counters.
Request-level series (tokens, finish reasons, latencies) are recorded once per request, at its end.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from outrider.scheduler.policy import MAX_DRAFT
from outrider.scheduler.serving import AsyncScheduler, RoundReport

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

P = "outrider:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, scheduler: AsyncScheduler,
                 actor_failures: Callable[[], dict[str, int]] = dict) -> None:
        """actor_failures: failures seen so far per role (actors that died, hung or raised), for the counter
        `outrider:actor_failures_total{role}`."""
        self.registry = r = CollectorRegistry()
        r.register(_ActorFailures(actor_failures))
        self.num_drafts = Counter(P + "spec_decode_num_drafts", "Rounds that drafted >= 1 token, summed over "
                                  "sequences", registry=r)
        self.num_draft_tokens = Counter(P + "spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.num_accepted = Counter(P + "spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter(P + "spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by position in the draft", ["position"], registry=r)
        for i in range(MAX_DRAFT):
            self.accepted_per_pos.labels(str(i))  # every position is exported from the start, at 0
        running = Gauge(P + "num_requests_running", "Requests holding a KV slot", registry=r)
        running.set_function(lambda: len(scheduler.running))
        waiting = Gauge(P + "num_requests_waiting", "Requests queued for a KV slot", registry=r)
        waiting.set_function(lambda: scheduler.queue_depth)
        self.success = Counter(P + "request_success", "Finished requests by finish reason", ["finished_reason"],
                               registry=r)
        self.failure = Counter(P + "request_failure", "Requests ended by an engine or actor failure", registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        # vLLM's pair: hit rate = hits / queries
        self.prefix_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter(P + "prefix_cache_hits", "Prompt tokens whose K/V the prefix cache supplied",
                                   registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Submission to last token", buckets=_LATENCY_BUCKETS,
                             registry=r)

    def on_round(self, report: RoundReport) -> None:
        """The scheduler's after_round hook."""
        for proposed, accepted in zip(report.proposed, report.accepted):
            if proposed == 0:
                continue
            self.num_drafts.inc()
            self.num_draft_tokens.inc(proposed)
            self.num_accepted.inc(accepted)
            for pos in range(accepted):
                self.accepted_per_pos.labels(str(pos)).inc()

    def on_request_end(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, created: float,
                       first_token_at: float | None, finished_at: float, cached_tokens: int = 0) -> None:
        """Observed once per request that ended without an engine error (times: time.perf_counter())."""
        self.success.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(finished_at - created)
        if first_token_at is not None:
            self.ttft.observe(first_token_at - created)
            if completion_tokens > 1:
                self.tpot.observe((finished_at - first_token_at) / (completion_tokens - 1))

    def on_request_failed(self) -> None:
        self.failure.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ActorFailures:
    """A counter read from the actors' recovery state at scrape time."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(P + "actor_failures", "Actor calls that failed (died, hung or raised); "
                                     "the actor restarts, a draft's failure only pauses speculation",
                                     labels=["role"])
        for role, count in self.read().items():
            family.add_metric([role], count)
        yield family
