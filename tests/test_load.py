"""`outrider bench load` against a real `outrider serve` child process on 127.0.0.1 (tiny random fp32 models):
1000 streamed requests of mixed lengths at concurrency 16, every stream complete, in order and equal to its
non-streamed reference. The checker itself is shown to catch lost, duplicated and reordered tokens, error
events and a missing finish, so a clean run means something."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from tiny_folders import write_tiny_pair

from outrider.bench.load import LoadOptions, LoadReport, Reference, Stream, make_specs, run_load
from outrider.bench.served import served

MAX_SEQ_LEN = 256
MAX_TOKENS = 64


def write_profile(tmp_path: Path) -> Path:
    target, _ = write_tiny_pair(tmp_path / "pair")
    spec = f"{{model: '{target}', weights: dense, dtype: float32}}"  # draft == target: every draft is checked
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"models:\n  target: {spec}\n  draft: {spec}\n"
        # threads 1: torch's second thread would fight this process's client for the second core; with both
        # the run time swung from 30 s to over 140 s on the 2-core machine, with it stays at ~30 s
        "placement: {mode: local, target: [{device: cpu, threads: 1}], draft: [{device: cpu}]}\n"
        "strategy: {name: vanilla, k: 3}\n"
        f"scheduler: {{max_running: 16, max_queued: 64, max_tokens: {MAX_TOKENS}, max_seq_len: {MAX_SEQ_LEN}, "
        "speculation_gate: false}\n")
    return path


# Measured on the 2-core dev machine: 32-36 s for this test (server start, 50 references, 1000 streams).
@pytest.mark.timeout(300)
def test_1000_streams_at_concurrency_16_lose_and_duplicate_nothing(tmp_path):
    options = LoadOptions(requests=1000, concurrency=16, distinct=50, seed=0, max_tokens=MAX_TOKENS,
                          deadline_s=240)
    t0 = time.monotonic()
    with served(write_profile(tmp_path), start_timeout_s=120) as url:
        report = run_load(url, options)
    figures = report.as_json()
    print(json.dumps(figures), f"test wall {time.monotonic() - t0:.1f}s")  # the figures, with pytest -s
    assert figures["failed"] == 0, figures["failed_by_reason"]
    assert figures["ok"]
    assert figures["completed"] == 1000
    assert figures["lost"] == figures["duplicated"] == figures["out_of_order"] == 0
    assert figures["mismatched"] == figures["usage_mismatched"] == 0
    assert report.tokens > 1000 and len(report.ttft_s) == 1000 and figures["tpot_ms"]["p99"] is not None


def test_specs_mix_kinds_and_lengths_within_the_context():
    specs = make_specs(random.Random(0), 50, MAX_SEQ_LEN, MAX_TOKENS)
    assert {s.chat for s in specs} == {True, False} and {s.seed is None for s in specs} == {True, False}
    assert any(s.stop for s in specs) and len({s.max_tokens for s in specs}) > 10
    assert len({len(s.prompt) for s in specs}) > 10
    assert all(4 <= s.max_tokens <= MAX_TOKENS and len(s.prompt) + s.max_tokens + 9 + 64 <= MAX_SEQ_LEN
               for s in specs)


# -- the checker catches what it must ---------------------------------------------------------------------

REF = Reference("abcd", [1, 2, 3, 4])


def chunk(text: str, ids: list[int], finish: str | None = None) -> str:
    return json.dumps({"choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}]})


USAGE = json.dumps({"choices": [], "usage": {"completion_tokens": 4}})


def checked(payloads: list[str]) -> dict:
    s = Stream(0, 0.0)
    for i, p in enumerate(payloads):
        s.record(p, 0.01 * (i + 1))
    report = LoadReport(1, 1, 1)
    report.add(s, REF)
    return report.as_json()


def test_a_clean_stream_passes():
    # the round of token 4 was held back (no chunk of its own): its id rides on the finish chunk
    r = checked([chunk("ab", [1, 2]), chunk("cd", [3]), chunk("", [4], "length"), USAGE, "[DONE]"])
    assert r["ok"] and r["completed"] == 1 and r["failed"] == 0 and r["ttft_ms"]["p50"] == 10.0


@pytest.mark.parametrize("payloads, field, count", [
    ([chunk("ab", [1, 2]), chunk("ab", [1, 2]), chunk("cd", [3, 4], "length"), USAGE, "[DONE]"], "duplicated", 2),
    ([chunk("ab", [1, 2]), chunk("d", [4], "length"), USAGE, "[DONE]"], "lost", 1),
    ([chunk("ab", [2, 1]), chunk("cd", [3, 4], "length"), USAGE, "[DONE]"], "out_of_order", 2),
    ([chunk("abcd", [1, 2, 3, 4], "length"), json.dumps({"choices": [], "usage": {"completion_tokens": 5}}),
      "[DONE]"], "usage_mismatched", 1),
], ids=["duplicated", "lost", "reordered", "usage"])
def test_token_faults_are_counted(payloads, field, count):
    r = checked(payloads)
    assert not r["ok"] and r["completed"] == 1 and r[field] == count
    assert r["mismatched"] == (field != "usage_mismatched")


@pytest.mark.parametrize("payloads, reason", [
    ([chunk("ab", [1, 2]), json.dumps({"error": {"message": "boom"}}), "[DONE]"], "error_event"),
    ([chunk("abcd", [1, 2, 3, 4]), USAGE, "[DONE]"], "misplaced_usage"),
    ([chunk("abcd", [1, 2, 3, 4], "length"), "[DONE]"], "done_before_finish"),
    ([chunk("abcd", [1, 2, 3, 4], "length"), USAGE, "[DONE]", chunk("x", [9])], "event_after_done"),
    (["{not json"], "bad_event"),
    ([json.dumps({"choices": [{"index": 0, "text": "ab", "finish_reason": None}]})], "missing_token_ids"),
    ([chunk("abcd", [1, 2, 3, 4], "length"), USAGE], "no_done"),
], ids=["error", "usage-first", "no-usage", "after-done", "bad-json", "no-ids", "no-done"])
def test_protocol_faults_fail_the_stream(payloads, reason):
    r = checked(payloads)
    assert not r["ok"] and r["completed"] == 0 and r["failed_by_reason"] == {reason: 1}


@pytest.mark.parametrize("argv, says", [
    (["--url", "http://127.0.0.1:9", "--profile", "p.yaml"], "exactly one of --url"),
    ([], "exactly one of --url"),
    (["--url", "http://127.0.0.1:9", "--concurrency", "1,4"], "one --concurrency number"),
    (["--url", "http://127.0.0.1:9", "--requests", "0"], "must be >= 1"),
])
def test_cli_refuses_bad_options_before_any_request(argv, says, capsys):
    from outrider.cli import main

    assert main(["bench", "load", *argv]) == 2
    assert says in capsys.readouterr().err

