"""`outrider bench` end to end on a tiny random GGUF used as both target and draft, plus the summary math
(α inversion, speedup bound) and the losslessness alarm on hand-made runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_state
from gguf_writer import tiny_hf_config, train_tiny_vocab, write_gguf

from outrider.bench.report import (
    expected_acceptance_length,
    first_difference,
    render_table,
    solve_alpha,
    speedup_bound,
    summarize,
)
from outrider.bench.run import greedy_mismatches, lossless_violations, parse_peers, parse_strategies
from outrider.cli import main

STRATEGIES = ["autoregressive", "vanilla", "prompt-lookup"]
SUMMARY_KEYS = {"tokens_per_s", "speedup", "mean_acceptance_length", "acceptance_per_position", "alpha", "c",
                "bound", "efficiency", "greedy_mismatches", "mismatched_prompts", "lossless", "k"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    vocab = train_tiny_vocab()
    cfg = tiny_hf_config("qwen2", vocab)
    return write_gguf(tmp_path_factory.mktemp("bench") / "tiny-qwen2.gguf", random_state(cfg, seed=3), cfg, vocab)


def test_pearl_with_the_draft_in_an_actor_and_the_overlap_bench(tiny_gguf, tmp_path, capsys):
    """--draft-actor: the draft runs in a Ray actor, so PEARL's block is drafted while the target verifies;
    output stays identical to plain decoding. `bench overlap` times the two phases alone and together."""
    import ray

    model = ["--target", str(tiny_gguf), "--draft", str(tiny_gguf), "--target-weights", "dense", "--draft-weights",
             "dense", "--dtype", "float32", "--draft-actor"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n", encoding="utf-8")
    try:
        out = tmp_path / "bench.json"
        assert main(["bench", *model, "--prompts", str(prompts), "--max-tokens", "12", "--ignore-eos",
                     "--strategies", "vanilla,pearl", "--json-out", str(out)]) == 0
        summary = json.loads(out.read_text())["summary"]
        assert summary["pearl"]["greedy_mismatches"] == 0 and summary["pearl"]["alpha"] == 1.0
        timeline = tmp_path / "overlap.json"
        assert main(["bench", "overlap", *model, "--overlap-iters", "2", "--json-out", str(timeline)]) == 0
        phases = json.loads(timeline.read_text())
        assert phases["draft alone"] > 0 and phases["together: draft done"] > 0 and phases["k"] == 3
    finally:
        ray.shutdown()
    assert "overlapped round" in capsys.readouterr().out


def test_bench_end_to_end(tiny_gguf, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nHello world! Hello there\n", encoding="utf-8")
    out = tmp_path / "bench.json"
    code = main(["bench", "--target", str(tiny_gguf), "--draft", str(tiny_gguf), "--target-weights", "dense",
                 "--draft-weights", "dense", "--dtype", "float32", "--prompts", str(prompts), "--max-tokens", "8",
                 "--ignore-eos", "--strategies", ",".join(STRATEGIES), "--json-out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert set(report) == {"config", "runs", "summary", "peers", "verify_ms_by_rows"} and report["peers"] == {}
    # each strategy's engine timed its verify forwards by rows (plain decoding: one row each)
    assert all(report["verify_ms_by_rows"][s] and min(report["verify_ms_by_rows"][s].values()) > 0 for s in STRATEGIES)
    assert list(report["verify_ms_by_rows"]["autoregressive"]) == ["1"]
    assert report["config"]["max_tokens"] == 8 and report["config"]["strategies"] == STRATEGIES
    runs = {(r["strategy"], r["prompt_index"]): r for r in report["runs"]}
    assert set(runs) == {(s, i) for s in STRATEGIES for i in range(2)} and len(report["runs"]) == 6
    for r in report["runs"]:
        assert r["new_tokens"] == len(r["token_ids"]) == 8 and r["seconds"] > 0 and r["tokens_per_s"] > 0
    summary = report["summary"]
    assert list(summary) == STRATEGIES
    for name, s in summary.items():
        assert SUMMARY_KEYS <= set(s), name
        assert s["greedy_mismatches"] == 0 and s["mismatched_prompts"] == [], name
    assert summary["autoregressive"]["speedup"] == 1.0
    assert summary["autoregressive"]["mean_acceptance_length"] == 1.0 and summary["autoregressive"]["alpha"] is None
    vanilla = summary["vanilla"]  # the draft is the target: every drafted token is accepted
    assert vanilla["mean_acceptance_length"] > 1 and vanilla["alpha"] == 1.0
    assert vanilla["acceptance_per_position"] and all(p == 1.0 for p in vanilla["acceptance_per_position"])
    assert vanilla["c"] > 0 and vanilla["bound"] > 0 and vanilla["efficiency"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in STRATEGIES:
        assert name in printed


def test_strategy_and_peer_parsing():
    assert parse_strategies("vanilla, prompt-lookup") == ["autoregressive", "vanilla", "prompt-lookup"]
    assert parse_strategies("vanilla,autoregressive,vanilla") == ["vanilla", "autoregressive"]
    with pytest.raises(ValueError, match="unknown strategy 'eagle'"):
        parse_strategies("eagle")
    assert parse_peers("") == [] and parse_peers("hf,llama.cpp") == ["hf", "llama.cpp"]
    with pytest.raises(ValueError, match="unknown peer"):
        parse_peers("vllm")


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.99, 1.0])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_solve_alpha_inverts_expected_length(alpha, k):
    assert solve_alpha(expected_acceptance_length(alpha, k), k) == pytest.approx(alpha, abs=1e-9)


def test_speedup_bound_matches_closed_form():
    alpha, k, c = 0.7, 4, 0.1
    assert speedup_bound(alpha, k, c) == pytest.approx((1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1)))
    assert speedup_bound(0.0, k, 0.0) == 1.0  # nothing accepted and free drafts: no gain, no loss


def fake_run(strategy: str, prompt: int, tokens: list[int], seconds: float, rounds: int, drafted: list[int],
             accepted: list[int]) -> dict:
    return {"strategy": strategy, "prompt_index": prompt, "token_ids": tokens, "new_tokens": len(tokens),
            "seconds": seconds, "rounds": rounds, "draft_tokens": sum(drafted), "accepted_tokens": sum(accepted),
            "accepted_per_position": accepted, "drafted_per_position": drafted, "draft_seconds": 0.1 * sum(drafted),
            "verify_seconds": 1.0 * rounds, "prefill_seconds": 0.5}


def test_summary_math_and_mismatch_alarm():
    runs = [fake_run("autoregressive", 0, [1, 2, 3, 4], 4.0, 4, [0, 0], [0, 0]),
            fake_run("vanilla", 0, [1, 2, 9, 9], 2.0, 2, [2, 2], [2, 0])]
    assert first_difference([1, 2, 3], [1, 2, 3, 4]) == 3
    mismatches = greedy_mismatches(runs, "vanilla")
    assert mismatches == [{"prompt_index": 0, "first_difference": 2}]
    s = summarize("vanilla", True, runs[1:], k=2, baseline_tps=1.0, mismatches=mismatches).as_json()
    assert s["speedup"] == 2.0 and s["mean_acceptance_length"] == 2.0  # (2 accepted + 2 rounds) / 2 rounds
    assert s["decode_tokens_per_s"] == pytest.approx(4 / 1.5, abs=1e-3)  # prefill excluded
    assert s["acceptance_per_position"] == [1.0, 0.0]
    assert s["alpha"] == pytest.approx(0.618, abs=1e-3)  # 1 + α + α² = 2: the golden ratio's conjugate
    assert s["c"] == pytest.approx(0.1) and s["bound"] == pytest.approx(2.0 / 1.2, abs=1e-4)
    assert s["efficiency"] == pytest.approx(1.2, abs=1e-3)
    assert lossless_violations({"vanilla": s}) == ["vanilla"]
    table = render_table({"vanilla": s}, {}, num_prompts=1)
    assert "MISMATCH 1/1" in table and "LOSSLESSNESS VIOLATED on prompt 0" in table


def bench_args(gguf: Path, tmp_path: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "one.txt"
    prompts.write_text("Hello world!\n", encoding="utf-8")
    return ["bench", "--target", str(gguf), "--draft", str(gguf), "--target-weights", "dense", "--draft-weights",
            "dense", "--dtype", "float32", "--prompts", str(prompts), "--max-tokens", "4", "--ignore-eos", *extra]


def test_peers_are_summarised_beside_strategies(tiny_gguf, tmp_path, capsys, monkeypatch):
    """The peer runners are replaced by a fake (the real ones need transformers' GGUF loading or llama.cpp
    binaries); what is under test is that bench hands them the templated prompts and reports their runs."""
    import outrider.bench.peers as peers

    seen: dict = {}

    def fake_hf(target, draft, prompts, max_tokens, dtype, threads):
        seen.update(target=target, draft=draft, prompts=prompts, max_tokens=max_tokens, dtype=dtype)
        return [peers.PeerRun("hf-float32", 0, 4, 2.0, 2.0, "ab", [5, 6, 7, 8], "fake"),
                peers.PeerRun("hf-float32-assisted", 0, 4, 1.0, 4.0, "ab", [5, 6, 7, 9], "fake")]

    monkeypatch.setattr(peers, "run_hf", fake_hf)
    out = tmp_path / "peers.json"
    code = main(bench_args(tiny_gguf, tmp_path, "--strategies", "autoregressive", "--no-warmup", "--peers", "hf",
                           "--json-out", str(out), "--plot", str(tmp_path / "chart.png")))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert seen["target"] == seen["draft"] == tiny_gguf.resolve() and seen["max_tokens"] == 4
    assert seen["prompts"] == ["<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n"
                               "Hello world!<|im_end|>\n<|im_start|>assistant\n"]
    hf = json.loads(out.read_text())["peers"]["hf"]
    assert (hf["plain_tokens_per_s"], hf["spec_tokens_per_s"], hf["speedup"]) == (2.0, 4.0, 2.0)
    assert (hf["compared_by"], hf["identical_runs"], hf["differing_prompts"]) == ("token_ids", 0, [0])
    assert "0/1 (ids)" in printed and (tmp_path / "chart.png").is_file()


def test_llama_cpp_runs_prompt_by_prompt_between_ours(tiny_gguf, tmp_path, capsys, monkeypatch):
    """llama.cpp runs on each prompt right after our strategies did (ratios taken seconds apart, not minutes, on a
    machine whose speed drifts), and its runs keep their prompt's index."""
    import outrider.bench.peers as peers

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llama-speculative-simple").write_text("")
    order: list[str] = []
    from outrider.pipeline import Pipeline

    real_generate = Pipeline.generate

    def generate(self, *a, **kw):
        order.append("ours")
        return real_generate(self, *a, **kw)

    def fake_llama(bin_dir_, target, draft, prompts, max_tokens, threads, draft_k):
        assert len(prompts) == 1
        order.append("llama.cpp")
        return [peers.PeerRun("llama.cpp", 0, 4, 1.0, 4.0, "ab", None, "fake"),
                peers.PeerRun("llama.cpp-spec", 0, 4, 0.5, 8.0, "ab", None, "fake")]

    monkeypatch.setattr(Pipeline, "generate", generate)
    monkeypatch.setattr(peers, "run_llama_cpp", fake_llama)
    prompts = tmp_path / "two.txt"
    prompts.write_text("Hello world!\nAnother prompt\n", encoding="utf-8")
    out = tmp_path / "llama.json"
    args = bench_args(tiny_gguf, tmp_path, "--strategies", "autoregressive,vanilla", "--no-warmup", "--peers",
                      "llama.cpp", "--llama-cpp", str(bin_dir), "--json-out", str(out))
    args[args.index("--prompts") + 1] = str(prompts)
    assert main(args) == 0, capsys.readouterr()
    assert order == ["ours", "ours", "llama.cpp", "ours", "ours", "llama.cpp"]
    llama = json.loads(out.read_text())["peers"]["llama.cpp"]
    assert sorted(r["prompt_index"] for r in llama["runs"]) == [0, 0, 1, 1]
    assert (llama["plain_tokens_per_s"], llama["spec_tokens_per_s"]) == (4.0, 8.0)


def test_peer_prerequisites_fail_before_loading(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUTRIDER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama.cpp binaries anywhere
    assert main(bench_args(tiny_gguf, tmp_path, "--peers", "llama.cpp")) == 2
    assert "--llama-cpp DIR" in capsys.readouterr().err
    assert main(bench_args(tiny_gguf, tmp_path, "--peers", "llama.cpp", "--llama-cpp", str(tmp_path))) == 2
    assert "llama-speculative-simple" in capsys.readouterr().err
