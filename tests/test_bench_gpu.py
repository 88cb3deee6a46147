"""`outrider bench gpu` end to end on the CPU with small shapes in place of the real ones (no CUDA here: the same
steps run eagerly). It guards the bench's code paths and the properties it reports: the served width scores a
row bitwise as decoding it alone, and speculation through the graph seams gives plain decoding's tokens."""
from __future__ import annotations

import json

import pytest

from outrider.bench import gpu
from outrider.runtime.config import ModelConfig
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.target import LocalTarget

pytestmark = pytest.mark.timeout(300)

SMALL = {"0.5b": ModelConfig("qwen2", 512, 64, 128, 2, 4, 2, 16, tie_embeddings=True, qkv_bias=True),
         "1.5b": ModelConfig("qwen2", 512, 96, 192, 3, 6, 2, 16, tie_embeddings=True, qkv_bias=True)}


@pytest.fixture
def small_shapes(monkeypatch):
    monkeypatch.setattr(gpu, "QWEN25", SMALL)


@pytest.fixture
def engine_runs(monkeypatch) -> list[tuple[str, int, list[int]]]:
    """Every engine run of the spec section as (drafter class, max_tokens, tokens): the report keeps only
    whether the runs agree, so the tokens are taken here to hold them against a reference."""
    runs, real = [], gpu._engine_run

    def spy(target, drafter, k, prompt, max_tokens):
        tokens, seconds, stats = real(target, drafter, k, prompt, max_tokens)
        runs.append((type(drafter).__name__, max_tokens, list(tokens)))
        return tokens, seconds, stats

    monkeypatch.setattr(gpu, "_engine_run", spy)
    return runs


def plain_reference(max_tokens: int) -> list[int]:
    """The spec section's target and prompt decoded by the engine alone, through LocalTarget (no graph seams, no
    padding to the served width): what every run of the section must produce."""
    target = gpu.random_model(SMALL["1.5b"], "cpu")
    prompt = gpu.token_ids(1000, 128, target.config.vocab_size)
    return Engine(LocalTarget(target, capacity=1024)).generate(Request(prompt, max_tokens)).generated


def test_every_section_runs_and_reports_what_it_promises(small_shapes, engine_runs, tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--gpu-shapes", "0.5b,1.5b", "--iters", "3", "--max-tokens", "12", "--tokens-per-round", "3.4",
                     "--cpu-threads", "2", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["weights"] == "random, real shapes"
    for row in report["graphs"]:
        assert row["bitwise_alone_vs_among_W"] is True
        assert row["graph_wW_ms"] > 0 and row["verify_W_ms"] > 0
    spec = report["spec"]
    assert spec["greedy_identical"] == {"plain": True, "self-draft": True, "0.5b-draft": True}
    # "plain" there is plain decoding compared with itself; what makes the row mean something is that the plain
    # run (and so every run that matched it) is the target's own greedy output, decoded independently here.
    reference = plain_reference(12)
    measured = [(name, tokens) for name, max_tokens, tokens in engine_runs if max_tokens == 12]
    assert [name for name, _ in measured] == ["NoneType", "GraphDrafter", "GraphDrafter"]
    assert len(reference) == 12 and all(tokens == reference for _, tokens in measured)
    assert spec["self-draft"]["mean_acceptance_length"] == 4.0  # a draft equal to the target: all k accepted
    assert spec["combined_spec_tok_s"] == pytest.approx(3.4 * 1e3 / spec["0.5b-draft"]["ms_per_round"], rel=0.01)
    dovetail = report["split"]  # the target on the CPU, the draft on the GPU (Dovetail's placement)
    assert dovetail["cpu_threads"] == 2
    assert {"draft_on_cpu_ms", "draft_on_gpu_ms", "combined_tok_s_draft_on_gpu"} <= set(dovetail)
    assert dovetail["overlap_gpu_draft_with_cpu_verify"]["together_ms"] > 0
