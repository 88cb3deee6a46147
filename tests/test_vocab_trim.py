"""VocabTrim keeps decoding lossless: a draft whose head knows only some tokens still gives the target's greedy
tokens and the target's exact sampling distribution (tokens outside the kept set come from the target alone)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_engine_sampling import (
    VOCAB,
    chi_square_p,
    exact_two_token_distribution,
    sampled_counts,
    small_vocab_model,
)

from outrider.scheduler.drafters import ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.target import LocalTarget
from outrider.scheduler.vocab_trim import TrimmedVocab, trim_head


def test_greedy_output_is_the_targets_with_a_trimmed_draft_head():
    target = tiny_model("llama", seed=0)
    prompt = [5, 9, 17, 5, 9, 33, 80]
    plain = Engine(LocalTarget(target, capacity=128)).generate(Request(prompt, 40)).generated
    vocab = TrimmedVocab.from_counts(Counter(plain[:20]), target.config.vocab_size, keep=32)
    draft = tiny_model("llama", seed=0, batch_invariant=False)  # the target's weights: high acceptance
    trim_head(draft, vocab)
    assert draft.weights.head.out_features == 32
    seq = Engine(LocalTarget(target, capacity=128), ModelDrafter(draft, capacity=128, kept_ids=vocab.ids),
                 lambda: FixedK(3)).generate(Request(prompt, 40))
    assert seq.generated == plain
    assert seq.stats.accepted_tokens > 0
    assert set(plain) - set(vocab.ids.tolist())  # some tokens came from the target alone


def test_sampling_with_a_trimmed_draft_matches_the_target_distribution():
    target, draft = small_vocab_model(0), small_vocab_model(1)
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11, 14])
    trim_head(draft, TrimmedVocab(kept, VOCAB))
    engine = Engine(LocalTarget(target, capacity=64), ModelDrafter(draft, capacity=64, kept_ids=kept),
                    lambda: FixedK(2))
    counts = sampled_counts(engine, 2500)
    exact = exact_two_token_distribution(target)
    assert chi_square_p(counts, exact) > 1e-3
    outside = [i for i in range(VOCAB * VOCAB) if i // VOCAB not in kept.tolist()]
    assert counts[outside].sum() > 0 and np.isclose(exact[outside].sum(), counts[outside].sum() / 2500, atol=0.05)


def test_kept_set_is_the_most_frequent_then_lowest_ids_in_multiples_of_16(tmp_path):
    vocab = TrimmedVocab.from_counts(Counter({300: 5, 7: 5, 1000: 9, 2: 1}), 2048, keep=20)
    ids = vocab.ids.tolist()
    assert len(ids) == 32 and {1000, 7, 300, 2} <= set(ids) and ids == sorted(ids)
    assert set(ids) - {1000, 7, 300, 2} == set(range(30)) - {7, 2}  # filled with the 28 lowest other ids
    vocab.save(tmp_path / "v.json")
    assert torch.equal(TrimmedVocab.load(tmp_path / "v.json").ids, vocab.ids)
    (tmp_path / "bad.json").write_text('{"vocab_size": 10, "ids": [1, 2, 30]}')
    with pytest.raises(ValueError, match="token ids must be in 0..9"):
        TrimmedVocab.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="draft vocabulary file is for 2048 tokens but the draft model has 256"):
        trim_head(tiny_model("llama"), vocab)


def test_a_gguf_head_keeps_its_stored_rows():
    """At --draft-weights gguf the kept rows are the file's own blocks, across parts of different types."""
    from outrider.kernels import gguf as G

    g = torch.Generator().manual_seed(0)
    head = G.GGUFLinear.from_blocks([G.random_blocks("Q4_K", 48, 256, g), G.random_blocks("Q8_0", 32, 256, g)],
                                    None, torch.float32)
    model = tiny_model("llama", weights="gguf")
    model.weights.head = head
    kept = torch.tensor(list(range(0, 16)) + list(range(40, 71)))  # spans both parts; 31 rows: a partial group
    trim_head(model, TrimmedVocab(kept, model.config.vocab_size))
    assert model.weights.head.qtypes == ["Q4_K", "Q8_0"]
    assert torch.equal(model.weights.head.dequantize(), head.dequantize()[kept])
