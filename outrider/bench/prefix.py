"""`outrider bench prefix-cache`: time to first token of a chat's second turn, with its first turn in the prefix
cache against the same kind of prompt with nothing of it cached, through `outrider serve` and a streaming client.

Each conversation pastes a standard-library source file (cut to --context-chars characters, about 1,500 tokens at
the default) and asks about it; the second turn resends the whole conversation, as chat clients do. Cold: a
conversation's second turn sent first, so nothing but the chat template's header is cached (its first-turn reply is
a fixed text of similar length). Warm: another conversation's first turn, then its second turn with the real
reply. Cold and warm alternate over --conversations pairs of different files, in one server run; the report gives
each turn's TTFT, prompt tokens and cached tokens (the response's `usage.prompt_tokens_details.cached_tokens`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx

from outrider.bench.served import served

MODE = "prefix-cache"
SOURCES = ("json/decoder.py", "textwrap.py", "heapq.py", "shlex.py", "fnmatch.py", "bisect.py", "queue.py",
           "colorsys.py")
CANNED_REPLY = ("This module defines helper functions and classes; it parses its input step by step, keeps state in "
                "a few module-level constants and raises errors with the position of the problem.")
READ_TIMEOUT_S = 600.0


def add_prefix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conversations", type=int, default=2,
                   help=f"{MODE}: cold / warm pairs, each on its own source file (at most {len(SOURCES) // 2})")
    p.add_argument("--context-chars", type=int, default=5200,
                   help=f"{MODE}: characters of source pasted into each conversation (about 3.5 per token)")


def document(index: int, chars: int) -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / SOURCES[index % len(SOURCES)]
    return path.read_text(encoding="utf-8")[:chars]


def turn_one(doc: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Here is a Python module:\n```python\n{doc}\n```\nSummarise what it does."}]


def turn_two(first: list[dict[str, str]], reply: str) -> list[dict[str, str]]:
    return first + [{"role": "assistant", "content": reply},
                    {"role": "user", "content": "Now list the functions it defines, one per line."}]


def stream_chat(client: httpx.Client, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat request: its TTFT (sending to the first chunk with text), text and usage."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, text, usage = time.perf_counter(), None, "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']}")
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text += piece
            usage = event.get("usage") or usage
    return {"ttft_s": round(ttft if ttft is not None else time.perf_counter() - t0, 3), "text": text,
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def run_prefix_bench(a: argparse.Namespace) -> int:
    if not 1 <= a.conversations <= len(SOURCES) // 2:
        raise SystemExit(f"--conversations must be in 1..{len(SOURCES) // 2}")
    profile = a.profile or "deploy/profiles/cpu.yaml"
    max_tokens = a.max_tokens or 32
    runs = []
    with (nullcontext(a.url) if a.url else served(profile)) as url, \
            httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, read=READ_TIMEOUT_S), trust_env=False) as client:
        for i in range(a.conversations):
            cold = stream_chat(client, turn_two(turn_one(document(2 * i, a.context_chars)), CANNED_REPLY), max_tokens)
            first = turn_one(document(2 * i + 1, a.context_chars))
            one = stream_chat(client, first, max_tokens)
            warm = stream_chat(client, turn_two(first, one["text"]), max_tokens)
            runs.append({"cold_turn_2": _brief(cold), "warm_turn_1": _brief(one), "warm_turn_2": _brief(warm),
                         "ttft_ratio": round(cold["ttft_s"] / warm["ttft_s"], 2)})
            print(f"pair {i}: cold turn 2 {cold['prompt_tokens']} tokens ({cold['cached_tokens']} cached) TTFT "
                  f"{cold['ttft_s']:.2f} s; warm turn 2 {warm['prompt_tokens']} tokens ({warm['cached_tokens']} "
                  f"cached) TTFT {warm['ttft_s']:.2f} s: {runs[-1]['ttft_ratio']}x", flush=True)
    summary = {"cold_ttft_s_median": statistics.median(r["cold_turn_2"]["ttft_s"] for r in runs),
               "warm_ttft_s_median": statistics.median(r["warm_turn_2"]["ttft_s"] for r in runs)}
    summary["ttft_ratio"] = round(summary["cold_ttft_s_median"] / summary["warm_ttft_s_median"], 2)
    print(f"median TTFT of turn 2: cold {summary['cold_ttft_s_median']:.2f} s, warm "
          f"{summary['warm_ttft_s_median']:.2f} s: {summary['ttft_ratio']}x faster with the prefix cache")
    if a.json_out:
        config = {"profile": str(profile), "conversations": a.conversations, "context_chars": a.context_chars,
                  "max_tokens": max_tokens, "sources": list(SOURCES[:2 * a.conversations])}
        Path(a.json_out).write_text(json.dumps({"config": config, "runs": runs, "summary": summary}, indent=2))
    return 0


def _brief(turn: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in turn.items() if k != "text"}
