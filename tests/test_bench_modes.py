"""`outrider bench serving`, `kernels` and `multi-draft` run end to end and report what they claim: the serving
bench checks greedy identity across concurrency levels; the kernel table's ratios are relative to one row."""
from __future__ import annotations

import json

import pytest

from outrider.cli import main
from outrider.kernels.native import available as native_available
from outrider.profile import PROFILES_DIR


def test_serving_bench_in_process_reports_every_level_with_identical_outputs(tmp_path, capsys):
    out = tmp_path / "serving.json"
    code = main(["bench", "serving", "--profile", str(PROFILES_DIR / "tiny.yaml"), "--modes", "local",
                 "--concurrency", "1,3", "--requests", "3", "--max-tokens", "8", "--prompts", "code-heldout",
                 "--limit", "3", "--json-out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    levels = report["levels"]
    assert [(lv["mode"], lv["concurrency"], lv["requests"]) for lv in levels] == [("local", 1, 3), ("local", 3, 3)]
    for lv in levels:
        assert lv["tokens"] == 3 * 8 and lv["tokens_per_s"] > 0 and lv["rounds"] >= 1
        assert lv["ttft_ms_p50"] <= lv["ttft_ms_p99"]
    assert report["greedy_mismatches"] == []
    assert "greedy outputs identical across modes and concurrencies: True" in capsys.readouterr().out


def test_kernel_bench_times_each_format_relative_to_one_row(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    code = main(["bench", "kernels", "--formats", "int8,int4,gguf", "--kernel-rows", "1,4", "--iters", "2",
                 "--kernel-layers", "2", "--json-out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    from outrider.kernels.gguf import paths

    # gguf: every kernel path of this process (vnni and amx on a CPU with AMX), timed in the same run
    assert [r["format"] for r in results] == ["int8", "int4"] + [f"gguf-{p}" for p in paths()]
    for r in results:
        assert r["rows"] == [1, 4] and r["layers"] == 2 and r["ratio"][0] == 1.0 and all(t > 0 for t in r["ms"])
        assert r["bytes"] > 0 and r["gbps_m1"] > 0
        # the plain read of the same bytes, timed beside the kernel where our kernels run
        assert r["read_gbps"] > 0 if native_available() else r["read_gbps"] is None
    assert results[1]["bytes"] < results[0]["bytes"]  # int4 streams fewer bytes than int8


def test_multi_draft_bench_reports_each_verifier_within_its_bound(tmp_path, capsys):
    from tiny_folders import write_tiny_pair

    target, draft = write_tiny_pair(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n", encoding="utf-8")
    out = tmp_path / "md.json"
    code = main(["bench", "multi-draft", "--target", str(target), "--draft", str(draft), "--target-weights", "dense",
                 "--draft-weights", "dense", "--dtype", "float32", "--prompts", str(prompts),
                 "--max-tokens", "8", "--ignore-eos", "--temperature", "1", "--n-drafts", "1,3",
                 "--bound-positions", "4", "--verifier-draws", "64", "--json-out", str(out)])
    assert code == 0
    assert "support cut moves any bound" in capsys.readouterr().out
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"with-replacement", "without-replacement", "greedy"}
    for cells in summary.values():
        assert cells["3"]["optimal"] >= cells["1"]["optimal"] - 1e-9  # more drafts never lower the optimum
        for c in cells.values():
            assert 0 <= c["verifier"] <= c["optimal"] + 0.1  # a Monte Carlo mean of 64 draws per position
    assert summary["greedy"]["3"]["verifier"] == pytest.approx(summary["greedy"]["3"]["optimal"], abs=0.1)
    assert out.with_suffix(".png").stat().st_size > 0


def test_prefill_bench_times_each_kernel_path_and_checks_they_agree(tmp_path, capsys):
    """Every kernel path of the process prefills the same real prompt cold (the prefix cache is refused, not
    trusted), gives the same first-token logits (else the bench fails), and reports tok/s consistent with TTFT."""
    from outrider.kernels.gguf import paths

    out = tmp_path / "prefill.json"
    code = main(["bench", "prefill", "--target", "smollm2-135m-instruct", "--target-weights", "gguf",
                 "--prompt-lengths", "40,70", "--iters", "1", "--json-out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [(r["path"], r["tokens"]) for r in rows] == [(p, n) for n in (40, 70) for p in paths()]
    for r in rows:
        assert r["system"] == "outrider" and r["ttft_s"] > 0
        assert r["prompt_tok_s"] * r["ttft_s"] == pytest.approx(r["tokens"], rel=0.02)  # both rounded
