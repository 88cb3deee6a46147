"""`outrider bench gpu` end to end on the CPU with small shapes in place of the real ones (no CUDA here: the same
steps run eagerly). It guards the bench's code paths and the properties it reports: the served width scores a
row bitwise as decoding it alone, and speculation through the graph seams gives plain decoding's tokens."""
from __future__ import annotations

import json

import pytest

from outrider.bench import gpu
from outrider.runtime.config import ModelConfig

pytestmark = pytest.mark.timeout(300)

SMALL = {"0.5b": ModelConfig("qwen2", 512, 64, 128, 2, 4, 2, 16, tie_embeddings=True, qkv_bias=True),
         "1.5b": ModelConfig("qwen2", 512, 96, 192, 3, 6, 2, 16, tie_embeddings=True, qkv_bias=True)}


@pytest.fixture
def small_shapes(monkeypatch):
    monkeypatch.setattr(gpu, "QWEN25", SMALL)


def test_every_section_runs_and_reports_what_it_promises(small_shapes, tmp_path):
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
    assert spec["self-draft"]["mean_acceptance_length"] == 4.0  # a draft equal to the target: all k accepted
    assert spec["combined_spec_tok_s"] == pytest.approx(3.4 * 1e3 / spec["0.5b-draft"]["ms_per_round"], rel=0.01)
    dovetail = report["dovetail"]
    assert dovetail["cpu_threads"] == 2
    assert {"draft_on_cpu_ms", "draft_on_gpu_ms", "combined_tok_s_draft_on_gpu"} <= set(dovetail)
    assert dovetail["overlap_gpu_draft_with_cpu_verify"]["together_ms"] > 0
