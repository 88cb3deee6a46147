"""EasySpec's layer-parallel drafter: lossless for every group size, exact after calibration, fuzzy before it.

The drafts here come from batch-invariant fp32 models, so an exact pass over any chunking of the same tokens
gives the same bits and the calibrated K/V can be compared with torch.equal (a production draft runs the
cheaper ExactPlan, where the same holds up to rounding).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT, in_process, plain, random_state, speculative, tiny_config
from test_engine_sampling import PARAMS, VOCAB, chi_square_p, exact_two_token_distribution, small_vocab_model

from outrider.methods import METHODS
from outrider.methods.easyspec.drafter import VARIANTS, LayerParallelDrafter, layer_groups
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.config import ModelConfig
from outrider.runtime.loading import build_weights
from outrider.runtime.model import Transformer
from outrider.scheduler.drafters import Draft, DraftRequest, ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget


def four_layer_model(seed: int) -> Transformer:
    """tiny_llama with 4 layers, so groups of 2 and 4 differ."""
    cfg = tiny_config("llama") | {"num_hidden_layers": 4}
    config = ModelConfig.from_hf(cfg)
    weights = build_weights(config, random_state(cfg, seed).__getitem__, torch.float32, "dense", torch.device("cpu"))
    return Transformer(config, weights, torch.float32)


@pytest.fixture(scope="module")
def target():
    return four_layer_model(0)


@pytest.fixture(scope="module")
def other():
    return four_layer_model(123)


class Recorder:
    """A drafter that keeps every request and draft, and can check the draft cache after each proposal."""

    def __init__(self, inner: ModelDrafter, check=None):
        self.inner, self.check, self.rounds = inner, check, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = self.inner.propose(requests)
        for r, d in zip(requests, drafts):
            self.rounds.append((list(r.tokens), d))
            if self.check is not None:
                self.check(self.inner, r, d)
        return drafts


def acceptance(seq) -> float:
    return seq.stats.accepted_tokens / seq.stats.draft_tokens


def test_layer_groups():
    assert layer_groups(4, 2) == [range(0, 2), range(2, 4)]
    assert layer_groups(8, 3, exact_edges=1) == [range(0, 1), range(1, 4), range(4, 7), range(7, 8)]
    assert layer_groups(3, 4) == [range(0, 3)]
    assert layer_groups(3, 2, exact_edges=2) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="group size"):
        layer_groups(4, 0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_greedy_output_is_the_targets(target, other, reference, group_size, variant):
    for k in range(1, 6):
        for draft in (target, other):
            drafter = LayerParallelDrafter(draft, capacity=256, group_size=group_size, variant=variant)
            seq = speculative(target, drafter, k)
            assert seq.generated == reference, f"k={k}, draft={'target' if draft is target else 'unrelated'}"
            if draft is other:
                assert seq.stats.accepted_tokens < seq.stats.draft_tokens


def test_exact_edges_stay_lossless(target, reference):
    drafter = LayerParallelDrafter(target, capacity=256, group_size=2, exact_edges=1)
    assert drafter.groups == [range(0, 1), range(1, 3), range(3, 4)]
    assert speculative(target, drafter, 4).generated == reference


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=7)])
def test_group_size_one_is_the_sequential_drafter_bit_for_bit(target, other, params):
    runs = []
    for drafter in (ModelDrafter(other, capacity=256), LayerParallelDrafter(other, capacity=256, group_size=1)):
        recorder = Recorder(drafter)
        runs.append((speculative(target, recorder, 4, params=params).generated, recorder.rounds))
    (tokens_a, rounds_a), (tokens_b, rounds_b) = runs
    assert tokens_a == tokens_b and len(rounds_a) == len(rounds_b)
    for (context_a, a), (context_b, b) in zip(rounds_a, rounds_b):
        assert context_a == context_b and a.tokens == b.tokens
        assert (a.probs is None) == (b.probs is None)
        assert a.probs is None or torch.equal(a.probs, b.probs)


def exact_pass(model: Transformer, tokens: list[int]):
    """A fresh sequential forward over tokens: its cache and the logits after the last one."""
    cache = model.new_cache(1, 256)
    logits = model.forward(ForwardBatch.chain([0], [tokens], [0]), cache, torch.tensor([len(tokens) - 1])).logits
    return cache, logits[0]


def same_kv(drafter: LayerParallelDrafter, seq_id: int, fresh, start: int, end: int) -> bool:
    """Whether the drafter's K/V at positions start..end-1 equal `fresh`'s, in every layer."""
    slot = drafter.seqs[seq_id].slot
    pairs = zip(drafter.cache.keys + drafter.cache.values, fresh.keys + fresh.values)
    return all(torch.equal(mine[slot, :, start:end], theirs[0, :, start:end]) for mine, theirs in pairs)


def check_calibration(drafter: LayerParallelDrafter, request: DraftRequest, draft: Draft) -> None:
    """After a proposal: the committed prefix holds exact K/V, d_1 is the exact draft's choice, and the K/V of
    the drafts fed in fuzzy steps differ from an exact pass over them."""
    committed = request.tokens
    fresh, logits = exact_pass(drafter.model, committed)
    assert draft.tokens[0] == int(logits.argmax())
    assert drafter.exact_len[request.seq_id] == len(committed)
    assert same_kv(drafter, request.seq_id, fresh, 0, len(committed))
    fed = draft.tokens[:-1]  # the last draft is never fed
    if fed:
        fuzzy, _ = exact_pass(drafter.model, committed + fed)
        assert not same_kv(drafter, request.seq_id, fuzzy, len(committed), len(committed) + len(fed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group_size", [2, 4])
def test_calibration_makes_the_committed_kv_exact(target, reference, group_size, variant):
    recorder = Recorder(LayerParallelDrafter(target, capacity=256, group_size=group_size, variant=variant),
                        check_calibration)
    seq = speculative(target, recorder, 4)
    assert seq.generated == reference
    # The check ran on prefixes holding once-fuzzy drafts: some round accepted two drafts or more.
    assert max(seq.stats.accepted_per_position[1:]) > 0
    timers = recorder.inner.timers
    assert timers.fuzzy_steps > 0 and timers.exact_steps == 0
    assert timers.calibration_rows > seq.stats.rounds  # accepted drafts are fed again, exactly


def test_fuzzy_drafting_accepts_no_more_than_exact_on_a_correlated_pair(target):
    exact = speculative(target, LayerParallelDrafter(target, capacity=256, group_size=1), 4, max_tokens=60)
    assert acceptance(exact) == 1.0  # the draft is the target
    for group_size in (2, 4):
        for variant in VARIANTS:
            fuzzy = speculative(target, LayerParallelDrafter(target, capacity=256, group_size=group_size,
                                                             variant=variant), 4, max_tokens=60)
            assert 0.5 < acceptance(fuzzy) <= acceptance(exact), (group_size, variant, acceptance(fuzzy))


def test_several_sequences_in_one_step_match_each_alone(target, other):
    prompts = [PROMPT, PROMPT[:6], [7, 3, 200, 41]]
    alone = [plain(target, p, 24) for p in prompts]
    engine = Engine(LocalTarget(target, 3, 256), LayerParallelDrafter(other, 3, 256), lambda: FixedK(3))
    seqs = [engine.add(Request(p, 24)) for p in prompts]
    while not all(s.finished for s in seqs):
        live = [s for s in seqs if not s.finished]
        engine.step(live)
        for s in live:
            if s.finished:
                engine.release(s, "length")
    assert [s.generated for s in seqs] == alone
    assert engine.drafter.slots_in_use() == 0


def test_sampling_matches_the_target_distribution():
    """Three-token budget so k = 2: d_2 is drawn from a fuzzy q, and verified with that same q."""
    target, draft = small_vocab_model(0), small_vocab_model(1)
    drafter = LayerParallelDrafter(draft, capacity=64, group_size=2)
    engine = Engine(LocalTarget(target, capacity=64), drafter, lambda: FixedK(2))
    counts = np.zeros(VOCAB * VOCAB)
    for seed in range(600):
        params = SamplingParams(PARAMS.temperature, PARAMS.top_k, seed=seed)
        first, second = engine.generate(Request([3, 7, 1], 3, params)).generated[:2]
        counts[first * VOCAB + second] += 1
    assert drafter.timers.fuzzy_steps > 0
    assert chi_square_p(counts, exact_two_token_distribution(target)) > 1e-3
    # Negative control: the draft's own distribution is told apart by the same test.
    assert chi_square_p(counts, exact_two_token_distribution(draft)) < 1e-6


def test_strategy_builds_the_drafter_with_the_group_size(target):
    easyspec = METHODS["easyspec"]
    drafter = easyspec.parts(easyspec.Options(draft_group=4), in_process(target)).drafter
    assert isinstance(drafter, LayerParallelDrafter) and drafter.groups == [range(0, 4)]


def test_bad_settings_are_refused(target):
    with pytest.raises(ValueError, match="variant"):
        LayerParallelDrafter(target, capacity=256, variant="mlp")
    with pytest.raises(ValueError, match="group size"):
        LayerParallelDrafter(target, capacity=256, group_size=0)
