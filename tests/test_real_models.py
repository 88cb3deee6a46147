"""End to end on real checkpoints at the served format: speculative greedy output is the target's own.

`make test` pulls the built-in models first (`outrider models pull ...`); a missing model is a failure with the
command to fix it, never a skip.
"""
from __future__ import annotations

import pytest
import torch

from outrider import hub
from outrider.methods.dovetail.head import DGFHead, FeatureDrafter
from outrider.pipeline import Pipeline
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "Explain what a hash map is in two sentences.",
           "def quicksort(xs):"]


def require(name: str) -> str:
    path = hub.model_path(name)
    assert path.exists(), f"{name} is not pulled: run `outrider models pull {name}` (make test does)"
    return name


@pytest.fixture(scope="module")
def smollm():
    name = require("smollm2-135m-instruct")
    # The draft is the same model quantized to int4: a cheap, well-aligned drafter for a self-check.
    return Pipeline.from_flags(["--target", name, "--draft", name, "--target-weights", "int8", "--draft-k", "4",
                                "--max-seq-len", "1024"], ["autoregressive", "vanilla", "prompt-lookup"])


@pytest.mark.parametrize("strategy", ["vanilla", "prompt-lookup"])
def test_smollm2_speculative_equals_plain_at_served_format(smollm, strategy):
    for i, text in enumerate(PROMPTS):
        ids = smollm.encode(text, chat=i < 2)
        plain = smollm.generate(ids, "autoregressive", 48, ignore_eos=True)
        spec = smollm.generate(ids, strategy, 48, ignore_eos=True)
        assert spec.token_ids == plain.token_ids, f"prompt {i}"
        assert spec.text == plain.text


def test_smollm2_answers_sensibly(smollm):
    out = smollm.generate(smollm.encode("What is the capital of France?", chat=True), "vanilla", 24)
    assert "Paris" in out.text
    assert out.stats.mean_acceptance_length > 1.5  # the int4 self-draft agrees with its int8 target often


def test_smollm2_dense_bf16_is_lossless_too(smollm):
    name = smollm.deployment.profile.models.target.model
    pipe = Pipeline.from_flags(["--target", name, "--draft", name, "--target-weights", "dense", "--draft-k", "6",
                                "--max-seq-len", "1024"], ["autoregressive", "vanilla"])
    ids = pipe.encode(PROMPTS[0], chat=True)
    assert (pipe.generate(ids, "vanilla", 40, ignore_eos=True).token_ids
            == pipe.generate(ids, "autoregressive", 40, ignore_eos=True).token_ids)


def test_sampling_on_a_real_model_is_seeded(smollm):
    ids = smollm.encode(PROMPTS[1], chat=True)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3)
    a = smollm.generate(ids, "vanilla", 24, params)
    b = smollm.generate(ids, "vanilla", 24, params)
    assert a.token_ids == b.token_ids


@pytest.fixture(scope="module")
def default_pair():
    return Pipeline.from_flags(["--target", require(hub.DEFAULT_TARGET), "--draft", require(hub.DEFAULT_DRAFT),
                                "--draft-k", "4", "--max-seq-len", "1024"],
                               ["autoregressive", "vanilla", "pearl", "easyspec", "dovetail"])


@pytest.mark.parametrize("strategy", ["vanilla", "pearl", "easyspec", "dovetail"])
def test_default_pair_speculative_equals_plain(default_pair, strategy):
    for text in PROMPTS[:2]:
        ids = default_pair.encode(text, chat=True)
        plain = default_pair.generate(ids, "autoregressive", 32, ignore_eos=True)
        spec = default_pair.generate(ids, strategy, 32, ignore_eos=True)
        assert spec.token_ids == plain.token_ids
        assert spec.stats.mean_acceptance_length > 1.5


def test_default_pair_with_a_dovetail_head_equals_plain(default_pair):
    """A DGF head over the real target's hidden states (untrained: its drafts are mostly rejected, which is the
    hard case for rollback) leaves the output the target's own."""
    head = DGFHead(default_pair.target, layers=1, dtype=torch.bfloat16)
    ids = default_pair.encode(PROMPTS[0], chat=True)
    plain = Engine(LocalTarget(default_pair.target, capacity=1024)).generate(Request(ids, 24)).generated
    target = LocalTarget(default_pair.target, capacity=1024)
    engine = Engine(target, FeatureDrafter(head, target.record_features(), capacity=1024), lambda: FixedK(3))
    seq = engine.generate(Request(ids, 24))
    assert seq.generated == plain
    assert seq.stats.draft_tokens > 0


def test_default_pair_at_gguf_weights_speculative_equals_plain():
    """At `--weights gguf` the target runs the file's own Q4_K/Q6_K blocks through our int8-activation kernel and
    the draft its Q5_0/Q8_0/Q4_K/Q6_K blocks; verification stays bitwise the plain decode's."""
    pipe = Pipeline.from_flags(["--target", require(hub.DEFAULT_TARGET), "--draft", require(hub.DEFAULT_DRAFT),
                                "--target-weights", "gguf", "--draft-weights", "gguf", "--draft-k", "4",
                                "--max-seq-len", "1024"], ["autoregressive", "vanilla"])
    for text in PROMPTS[:2]:
        ids = pipe.encode(text, chat=True)
        plain = pipe.generate(ids, "autoregressive", 32, ignore_eos=True)
        spec = pipe.generate(ids, "vanilla", 32, ignore_eos=True)
        assert spec.token_ids == plain.token_ids
        assert spec.stats.mean_acceptance_length > 1.5
