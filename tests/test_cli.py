"""`outrider generate` end to end on a tiny GGUF model, and the converted-weights cache."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import random_state
from gguf_writer import tiny_hf_config, train_tiny_vocab, write_gguf

from outrider.cli import main
from outrider.runtime.loading import converted_cache_path, load_model, parse_dtype


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    vocab = train_tiny_vocab(304)  # a multiple of 16, so int4 can pack the LM head
    cfg = tiny_hf_config("qwen2", vocab)
    return write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", random_state(cfg, 0), cfg, vocab)


def generate(capsys, gguf, *extra: str) -> dict:
    code = main(["generate", "--target", str(gguf), "--draft", str(gguf), "--max-tokens", "12", "--ignore-eos",
                 "--json", "--max-seq-len", "256", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_generate_json_schema_and_lossless_strategies(capsys, tiny_gguf):
    plain = generate(capsys, tiny_gguf, "--prompt", "def add(a, b):", "--strategy", "autoregressive")
    assert set(plain) >= {"text", "token_ids", "stats"}
    assert set(plain["stats"]) >= {"new_tokens", "seconds", "tokens_per_s", "rounds", "draft_tokens",
                                   "accepted_tokens", "mean_acceptance_length"}
    assert plain["stats"]["new_tokens"] == len(plain["token_ids"]) == 12
    for strategy in ("vanilla", "prompt-lookup"):
        spec = generate(capsys, tiny_gguf, "--prompt", "def add(a, b):", "--strategy", strategy,
                        "--compare-plain")
        assert spec["token_ids"] == plain["token_ids"] and spec["identical_to_plain"]
    chat = generate(capsys, tiny_gguf, "--chat", "hello", "--strategy", "vanilla", "--draft-k", "5")
    assert chat["stats"]["mean_acceptance_length"] > 1  # an int4 copy of the target agrees often


def test_bad_arguments_are_reported_with_the_fix(capsys, tiny_gguf):
    assert main(["generate", "--target", str(tiny_gguf), "--prompt", "x", "--draft-k", "12"]) == 2
    assert "--draft-k must be in 1..8" in capsys.readouterr().err
    assert main(["generate", "--target", str(tiny_gguf), "--prompt", "x", "--chat", "y"]) == 2
    assert "exactly one of --prompt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "--target", str(tiny_gguf), "--prompt", "x", "--device", "cuda"]) == 2
        assert "--device cpu" in capsys.readouterr().err
    assert main(["generate", "--target", "no-such-model", "--prompt", "x", "--strategy", "autoregressive"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_warm_start_maps_the_converted_weights(tiny_gguf):
    cached = converted_cache_path(tiny_gguf, parse_dtype("bfloat16"), "int4")
    cached.unlink(missing_ok=True)
    cold, _ = load_model(tiny_gguf, "bfloat16", "int4", max_positions=256)
    assert cached.exists()
    warm, _ = load_model(tiny_gguf, "bfloat16", "int4", max_positions=256)
    assert warm.weights.nbytes_per_token == cold.weights.nbytes_per_token
    for a, b in zip(cold.weights.layers, warm.weights.layers):
        assert all(x.equal(y) for x, y in zip(a.gate_up.state().values(), b.gate_up.state().values()))


def test_graph_steps_from_the_cli_keep_speculation_lossless(capsys, tiny_gguf):
    """--graphs: the target's fixed-width static steps (CUDA graphs on a GPU, eager here) and graph draft rounds;
    every model-drafted strategy gives plain decoding's tokens through them."""
    args = ("--prompt", "def add(a, b):", "--graphs", "--target-weights", "dense", "--draft-weights", "dense")
    plain = generate(capsys, tiny_gguf, *args, "--strategy", "autoregressive")
    for strategy in ("vanilla", "pearl", "dovetail"):
        spec = generate(capsys, tiny_gguf, *args, "--strategy", strategy)
        assert spec["token_ids"] == plain["token_ids"], strategy
        assert spec["stats"]["draft_tokens"] > 0
    assert main(["generate", "--target", str(tiny_gguf), "--prompt", "x", "--graphs", "--draft-actor"]) == 2
    assert "--graphs runs both models in this process" in capsys.readouterr().err
