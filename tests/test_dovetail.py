"""Dovetail's DGF draft head: the gate computes what §4 writes; the head file round-trips bitwise; drafting with it
is lossless (greedy identity for many k and prompts, batched too; the sampled distribution by chi-square); its KV
cache after every round equals a fresh recompute over the committed tokens; training on the target's own
generations lowers the loss and raises acceptance through the real Engine; `outrider train-dgf` writes a head that
`outrider generate --strategy dovetail --draft-head` serves."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT, in_process, plain, tiny_model
from safetensors.torch import save_file
from test_engine_sampling import chi_square_p, exact_two_token_distribution, sampled_counts, small_vocab_model
from tiny_folders import write_tiny_folder

from outrider.cli import main
from outrider.flags import parse, profile_from_args
from outrider.methods import METHODS
from outrider.methods.dovetail.head import FeatureDrafter, cached_attention, decoder_layer, load_head, save_head
from outrider.methods.dovetail.train import TrainConfig, collect, new_head, sample_loss, train
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.loading import load_model
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.target import LocalTarget, features_of

pytestmark = pytest.mark.timeout(180)
OTHER_PROMPTS = [PROMPT[:1], PROMPT[:4], [7, 8, 9, 10, 11, 12, 13]]  # a 1-token prompt has no feature at first


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is several times faster on a shared machine. Every target call of this
    module runs at the same count, which keeps the target's logits bitwise reproducible (a reduction's split
    follows the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def reset_threads():
    torch.set_num_threads(1)  # the CLI test's Pipeline.load sets its own count


@pytest.fixture(scope="module")
def train_prompts():
    g = torch.Generator().manual_seed(0)
    return [PROMPT] + [torch.randint(3, 256, (8,), generator=g).tolist() for _ in range(7)]


@pytest.fixture(scope="module")
def samples(target, train_prompts):
    return collect(target, train_prompts, 40)


@pytest.fixture(scope="module")
def trained(target, samples):
    """(head, per-step losses): 300 steps, about 3 s on one thread."""
    head = new_head(target, 1, seed=0)
    return head, train(head, samples, TrainConfig(steps=300, lr=1e-3, seed=0))


def dovetail(target, head, k: int, slots: int = 1) -> Engine:
    local = LocalTarget(target, num_slots=slots, capacity=256)
    return Engine(local, FeatureDrafter(head, local.record_features(), slots, capacity=256), lambda: FixedK(k))


def test_dgf_gate_matches_a_plain_reference(target):
    head = new_head(target, 2, seed=1)
    g = torch.Generator().manual_seed(0)
    f, x = torch.randn(5, 64, generator=g), torch.randint(0, 256, (5,), generator=g)
    e = target.weights.embed[x]
    normed = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + target.config.rms_norm_eps) * head.embed_norm
    h1 = f @ head.w1
    a = normed @ head.w2
    h2 = a * (1 / (1 + torch.exp(-a)))  # SiLU
    z = 1 / (1 + torch.exp(-(torch.cat([h1, h2], -1) @ head.wz)))
    assert torch.allclose(head.fuse(f, x), z * h1 + (1 - z) * h2, atol=1e-6)
    assert head.layers[0].input_norm is None and head.layers[1].input_norm is not None  # layer 0: no input norm
    assert not any(t is p for p in head.parameters() for t in (target.weights.embed, target.weights.norm))


def test_the_heads_layer_is_the_runtimes_layer():
    """The head's decoder layer is the runtime's layer math: given the target's own weights and the same attention
    (exact per-sequence attention over the cache, what the head drafts with), it gives the target's layer bit for
    bit."""
    model = tiny_model("llama", batch_invariant=False, native=False)
    batch = ForwardBatch.chain([0], [PROMPT], [0])
    h = model.embed(batch.token_ids)
    expected = model.layer(1, h, model.context(batch, model.new_cache(1, 64)))
    rope = model.rotary.tables(batch.positions, model.dtype)
    attend = cached_attention(batch, model.new_cache(1, 64), model.scale, model.device)(1)
    assert torch.equal(decoder_layer(h, model.weights.layers[1], model.config, rope, attend), expected)


def test_cached_feeding_in_chunks_equals_the_training_forward(target):
    """Drafting feeds pairs into the head's KV cache a few at a time; training runs them causally in one go."""
    head = new_head(target, 2, seed=1)
    g = torch.Generator().manual_seed(0)
    f, x = torch.randn(9, 64, generator=g), torch.randint(0, 256, (9,), generator=g)
    cache = head.new_cache(2, 64)
    slot = cache.acquire()
    cache.acquire()  # another sequence's slot: rows must land in their own
    outs = []
    for lo, hi in ((0, 4), (4, 5), (5, 9)):
        batch = ForwardBatch.chain([slot], [x[lo:hi].tolist()], [cache.lengths[slot]])
        outs.append(head(f[lo:hi], batch.token_ids, batch, cache))
    assert cache.lengths[slot] == 9
    assert torch.allclose(torch.cat(outs), head(f, x), atol=1e-5)


def test_head_file_round_trips_bitwise(tmp_path, target, trained):
    head, _ = trained
    path = save_head(head, tmp_path / "head.safetensors")
    loaded = load_head(path, target)
    mine, theirs = head.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(target.config.vocab_size not in t.shape for t in mine.values())  # no embedding, no LM head
    f, x = torch.randn(6, 64), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(head(f, x), loaded(f, x))
    with pytest.raises(ValueError, match="another target"):
        load_head(path, tiny_model("qwen2", seed=0))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Dovetail draft head"):
        load_head(tmp_path / "other.safetensors", target)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_greedy_output_equals_the_target_alone(target, trained, k, which):
    head = trained[0] if which == "trained" else new_head(target, 1, seed=3)
    accepted = {}
    for prompt in [PROMPT] + OTHER_PROMPTS:
        seq = dovetail(target, head, k).generate(Request(prompt, 30))
        assert seq.generated == plain(target, prompt, max_tokens=30), (prompt, k)
        accepted[len(prompt)] = seq.stats.accepted_tokens
    if which == "trained":  # PROMPT was among its training prompts: its drafts are accepted
        assert accepted[len(PROMPT)] > 0


def test_several_sequences_in_one_round_match_each_alone(target, trained):
    prompts = [PROMPT] + OTHER_PROMPTS
    engine = dovetail(target, trained[0], 4, slots=len(prompts))
    seqs = [engine.add(Request(p, 24)) for p in prompts]
    while any(not s.finished for s in seqs):
        engine.step([s for s in seqs if not s.finished])
    assert [s.generated for s in seqs] == [plain(target, p, max_tokens=24) for p in prompts]
    for s in seqs:
        engine.release(s)
    assert engine.drafter.slots_in_use() == 0 and engine.target.cache.slots_in_use == 0


def test_head_cache_after_every_round_equals_a_fresh_recompute(target, trained):
    """The sync keeps only pairs built from target features that are still committed: after each round (some
    drafts rejected, the last proposal's own pairs written past them) the head's K/V over the committed pairs
    and its next drafts equal those of a fresh drafter fed the committed tokens once."""
    engine = dovetail(target, trained[0], 4)
    seq = engine.add(Request(PROMPT, 30))
    while not seq.finished:
        engine.step([seq])
        request = engine.draft_requests([seq], [4])[0]
        fresh = FeatureDrafter(trained[0], engine.target, capacity=256)
        assert engine.drafter.propose([request])[0].tokens == fresh.propose([request])[0].tokens
        pairs = len(seq.tokens) - 1
        mine, theirs = engine.drafter.seqs[seq.seq_id], fresh.seqs[seq.seq_id]
        assert mine.fed == seq.tokens[1:]
        for kc_m, kc_f in zip(engine.drafter.cache.keys + engine.drafter.cache.values,
                              fresh.cache.keys + fresh.cache.values):
            assert torch.allclose(kc_m[mine.slot, :, :pairs], kc_f[theirs.slot, :, :pairs], atol=1e-5)
    assert 0 < seq.stats.accepted_tokens < seq.stats.draft_tokens  # rollbacks happened
    engine.release(seq)
    assert engine.drafter.slots_in_use() == 0


def test_plain_rounds_between_drafting_rounds_stay_lossless(target, trained):
    """The speculation gate may skip drafting for a while: the head then catches up on several new pairs."""
    engine = dovetail(target, trained[0], 3)
    seq = engine.add(Request(PROMPT, 40))
    for i in range(40):
        if seq.finished:
            break
        engine.step([seq], speculate=i % 4 in (0, 3))
    assert seq.generated == plain(target) and seq.stats.accepted_tokens > 0


def mean_acceptance(target, head, prompts, k: int = 4) -> float:
    engine = dovetail(target, head, k)
    stats = [engine.generate(Request(p, 40)).stats for p in prompts]
    return (sum(s.accepted_tokens for s in stats) + sum(s.rounds for s in stats)) / sum(s.rounds for s in stats)


def test_training_lowers_the_loss_and_raises_acceptance(target, train_prompts, samples, trained):
    head, losses = trained
    assert sum(losses[-30:]) / 30 < 0.5 * sum(losses[:30]) / 30
    untrained = new_head(target, 1, seed=0)  # the trained head's starting point
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = sum(sample_loss(untrained, s, 0.0, 0.1, gen)[0] for s in samples)
        after = sum(sample_loss(head, s, 0.0, 0.1, gen)[0] for s in samples)
    assert after < 0.5 * before
    tau_before, tau_after = mean_acceptance(target, untrained, train_prompts), mean_acceptance(target, head,
                                                                                               train_prompts)
    assert tau_before < 1.3 and tau_after > tau_before + 1.0, (tau_before, tau_after)


def test_training_is_deterministic_under_its_seed(target, samples):
    runs = []
    for _ in range(2):
        head = new_head(target, 1, seed=5)
        runs.append((train(head, samples[:2], TrainConfig(steps=5, lr=1e-3, seed=5)), head.state_dict()))
    assert runs[0][0] == runs[1][0] and all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_sampling_matches_the_target_distribution():
    target = small_vocab_model(0)
    exact = exact_two_token_distribution(target)
    head = new_head(target, 1, seed=0)
    train(head, collect(target, [[3, 7, 1], [5, 2, 9, 4]], 12), TrainConfig(steps=40, lr=1e-3))  # q nearer p
    local = LocalTarget(target, capacity=64)
    engine = Engine(local, FeatureDrafter(head, local.record_features(), capacity=64), lambda: FixedK(2))
    counts = sampled_counts(engine, 2500)
    assert chi_square_p(counts, exact) > 1e-3
    # Negative control: another model's distribution is told apart by the same test.
    assert chi_square_p(counts, exact_two_token_distribution(small_vocab_model(1))) < 1e-6


def test_strategy_builds_the_head_drafter_or_the_chain_drafter(target, trained, tmp_path):
    strategy, head = METHODS["dovetail"], str(save_head(trained[0], tmp_path / "head.safetensors"))
    with_head, without = strategy.Options(draft_head=head), strategy.Options()
    assert strategy.drafts_with_model(without) and not strategy.drafts_with_model(with_head)
    drafter = strategy.parts(with_head, in_process(target)).drafter
    assert isinstance(drafter, FeatureDrafter)
    drafter = strategy.parts(without, in_process(target)).drafter  # no head: the draft model chains
    assert type(drafter).__name__ == "ModelDrafter"
    seq = Engine(LocalTarget(target, capacity=256), drafter, lambda: FixedK(3)).generate(Request(PROMPT, 30))
    assert seq.generated == plain(target, max_tokens=30)


def test_a_target_without_features_is_refused_at_build(target, trained):
    class TokensOnlyTarget:  # what the actor seam (ActorTarget) offers: no record_features
        vocab_size, capacity = 256, 256

    with pytest.raises(ValueError, match="not through actors yet"):
        features_of(TokensOnlyTarget())
    with pytest.raises(ValueError, match="--draft-actor"):
        profile_from_args(parse(["--draft-actor"]), METHODS["dovetail"].Options(draft_head="head.safetensors"))


@pytest.mark.timeout(300)
def test_train_dgf_cli_writes_a_head_that_generate_serves(tmp_path, capsys):
    folder = write_tiny_folder(tmp_path / "target", seed=1, layers=4)
    out = tmp_path / "heads" / "dgf.safetensors"
    model = ["--target", str(folder), "--dtype", "float32", "--target-weights", "dense"]
    assert main(["train-dgf", *model, "--prompts", "code", "--limit", "3", "--max-tokens", "24", "--steps", "30",
                 "--lr", "1e-3", "--layers", "2", "--seed", "0", "--out", str(out)]) == 0
    assert "2-layer DGF head, 30 steps on 3 sequences" in capsys.readouterr().out
    head = load_head(out, load_model(folder, "float32", "dense")[0])
    assert len(head.layers) == 2

    def generate(*extra: str) -> dict:
        code = main(["generate", *model, "--prompt", "def add(a, b):", "--max-tokens", "16", "--ignore-eos",
                     "--json", "--max-seq-len", "256", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    spec = generate("--strategy", "dovetail", "--draft-head", str(out), "--draft-k", "4")
    assert spec["token_ids"] == generate("--strategy", "autoregressive")["token_ids"]
    assert spec["stats"]["draft_tokens"] > 0
    assert main(["generate", *model, "--prompt", "x", "--strategy", "dovetail", "--draft-head",
                 str(tmp_path / "missing.safetensors")]) == 2
    assert "train-dgf" in capsys.readouterr().err


def test_smooth_l1_and_soft_ce_are_the_training_loss(target, samples):
    """The loss is exactly SmoothL1(feature) + 0.1·CE against the target's own softmax (noise 0 here)."""
    head = new_head(target, 1, seed=2)
    s = samples[0]
    loss, feature, ce = sample_loss(head, s, 0.0, 0.1, torch.Generator())
    with torch.no_grad():
        predicted = head(s.features[:-1], s.tokens[1:])
        p = target.logits(s.features[1:]).softmax(-1)
        want_ce = -(p * head.train_logits(predicted).log_softmax(-1)).sum(-1).mean()
        want = F.smooth_l1_loss(predicted, s.features[1:]) + 0.1 * want_ce
    assert torch.allclose(loss.detach(), want, atol=1e-6) and abs(ce - want_ce.item()) < 1e-5 and feature > 0
