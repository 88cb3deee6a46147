"""Tree drafts served: a round scores a tree of draft tokens under its mask, accepts a root-to-node path and keeps
the K/V of that path only. Greedy output is the target's own for every shape and acceptance, both caches equal a
fresh prefill after every round, and the tree methods (`tree`, `suffix`) are lossless in process, batched, through
the async scheduler; bad options name themselves."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from conftest import PROMPT, in_process, plain, tiny_model
from fakes import TreeOracle
from pydantic import ValidationError

from outrider.flags import parse, profile_from_args
from outrider.methods import METHODS
from outrider.methods.rasd import RasdDrafter, RasdOptions, _Fused
from outrider.methods.suffix import SuffixDrafter, SuffixOptions
from outrider.methods.tree import TreeDrafter, TreeOptions
from outrider.scheduler.drafters import DraftRequest
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import MAX_VERIFY_ROWS, FixedK, TreeBudget, VerifyCost
from outrider.scheduler.retrieval import Corpus, best_paths
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.serving import AsyncScheduler
from outrider.scheduler.target import LocalTarget

CAPACITY = 256
BINARY = [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # depth 3, two children everywhere
SHAPES = {  # name: (parents, accepted path)
    "chain-full": ([-1, 0, 1, 2], [0, 1, 2, 3]),
    "chain-mixed": ([-1, 0, 1, 2], [0, 1]),
    "chain-zero": ([-1, 0, 1, 2], []),
    "siblings-last-right": ([-1, -1, -1, 0, 1, 2, 5], [2, 5, 6]),  # the kept K/V is not a prefix: compaction
    "siblings-mixed": ([-1, -1, -1, 0, 1, 2, 5], [1, 4]),
    "binary-full": (BINARY, [1, 5, 13]),
    "binary-mixed": (BINARY, [0, 3]),
    "sixteen-siblings": ([-1] * 16, [15]),
}


@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", seed=7)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tree_drafts_of_every_shape_give_the_target_tokens(target, reference, shape):
    parents, path = SHAPES[shape]
    oracle = TreeOracle(len(PROMPT), reference, parents, path)
    depth = max(oracle.depths)
    engine = Engine(LocalTarget(target, capacity=CAPACITY), oracle, lambda: FixedK(depth))
    out = engine.generate(Request(PROMPT, 40))
    assert out.generated == reference
    accepted = out.stats.accepted_tokens / out.stats.rounds
    if path == [] or shape.endswith("mixed"):
        assert accepted <= len(path) + 1e-9
    else:  # the whole path accepted every round but where max_tokens cut the last one short
        assert out.stats.rounds <= -(-40 // (len(path) + 1)) + 1


def assert_target_kv_is_a_fresh_prefill(target, engine_target: LocalTarget, slot: int, committed: list[int]) -> None:
    nxt = engine_target.score([slot], [[committed[-1]]])[0]
    engine_target.truncate(slot, len(committed) - 1)
    fresh = LocalTarget(target, capacity=CAPACITY)
    fresh_slot = fresh.acquire()
    fresh.prefill(fresh_slot, committed[:-1])
    assert torch.equal(nxt, fresh.score([fresh_slot], [[committed[-1]]])[0])


def assert_draft_kv_is_a_fresh_prefill(drafter: TreeDrafter, seq_id: int) -> None:
    """The draft cache holds the tokens it synced to (the accepted path kept from the round before among them) as
    one prefill of them leaves it, then this round's fed tree nodes."""
    seq = drafter.seqs[seq_id]
    length = len(seq.fed)
    assert drafter.cache.lengths[seq.slot] == length + len(drafter.grown[seq_id].fed_nodes)
    fresh = drafter.model.new_cache(1, CAPACITY)
    drafter.model.prefill(fresh, 0, seq.fed, 256)
    for layer in range(len(fresh.keys)):
        assert torch.equal(drafter.cache.keys[layer][seq.slot, :, :length], fresh.keys[layer][0, :, :length])
        assert torch.equal(drafter.cache.values[layer][seq.slot, :, :length], fresh.values[layer][0, :, :length])


def decode_checking_both_caches(target, drafter: TreeDrafter, k: int) -> tuple[Engine, object]:
    """Decode PROMPT for 40 tokens, checking the draft and target caches against fresh prefills every round."""
    engine_target = LocalTarget(target, capacity=CAPACITY)
    engine = Engine(engine_target, drafter, lambda: FixedK(k))
    seq = engine.add(Request(PROMPT, 40))
    while not seq.finished:
        engine.step([seq])
        assert_draft_kv_is_a_fresh_prefill(drafter, seq.seq_id)
        assert_target_kv_is_a_fresh_prefill(target, engine_target, seq.slot, seq.tokens)
    return engine, seq


@pytest.mark.parametrize("shape", ["siblings-last-right", "binary-mixed", "chain-zero"])
def test_target_kv_after_every_tree_round_equals_a_fresh_prefill(target, reference, shape):
    parents, path = SHAPES[shape]
    engine_target = LocalTarget(target, capacity=CAPACITY)
    engine = Engine(engine_target, TreeOracle(len(PROMPT), reference, parents, path), lambda: FixedK(3))
    seq = engine.add(Request(PROMPT, 30))
    while not seq.finished:
        engine.step([seq])
        assert_target_kv_is_a_fresh_prefill(target, engine_target, seq.slot, seq.tokens)
    engine.release(seq)
    assert engine_target.cache.slots_in_use == 0


@pytest.mark.parametrize("options", [TreeOptions(), TreeOptions(k=3, branching=4, max_nodes=16),
                                     TreeOptions(k=8, branching=2, max_nodes=8), TreeOptions(k=1, branching=1,
                                                                                              max_nodes=1)],
                         ids=["default", "wide", "deep", "one-node"])
@pytest.mark.parametrize("agrees", [False, True], ids=["unrelated-draft", "draft-is-target"])
def test_the_draft_model_tree_is_lossless_and_both_caches_stay_exact(target, reference, draft, options, agrees):
    """An unrelated draft is mostly rejected; the target as its own draft has whole paths accepted, whose draft
    K/V is kept (compacted) into the next round."""
    drafter = TreeDrafter(target if agrees else draft, options.branching, options.max_nodes, capacity=CAPACITY)
    engine, seq = decode_checking_both_caches(target, drafter, options.k)
    assert seq.generated == reference
    assert (seq.stats.accepted_tokens > 2 * seq.stats.rounds) == (agrees and options.k > 1)
    engine.release(seq)
    assert drafter.slots_in_use() == 0


def test_a_draft_that_is_the_target_has_its_first_choice_accepted_every_round(target, reference):
    drafter = TreeDrafter(target, 2, 6, capacity=CAPACITY, fit_cost=False)
    out = Engine(LocalTarget(target, capacity=CAPACITY), drafter, lambda: FixedK(4)).generate(Request(PROMPT, 40))
    assert out.generated == reference
    # the root's most probable child outranks every other node, so it is always drafted, and it is the argmax
    assert out.stats.accepted_per_position[0] == out.stats.rounds
    assert out.stats.draft_tokens == 6 * out.stats.rounds  # trees, not chains: more nodes than the depth of 4


def test_tree_method_builds_from_its_options_and_serves_several_sequences_at_once(target, draft):
    prompts = [PROMPT, PROMPT[:4], [7, 8, 9, 10, 11, 12, 13]]
    alone = [plain(target, p, max_tokens=20) for p in prompts]
    env = in_process(target, draft, slots=3)
    parts = METHODS["tree"].parts(TreeOptions(k=4, branching=2, max_nodes=6), env)
    engine = Engine(env.target, parts.drafter, parts.policy, parts.rounds)
    seqs = [engine.add(Request(p, 20)) for p in prompts]
    while any(not s.finished for s in seqs):
        engine.step([s for s in seqs if not s.finished])
    assert [s.generated for s in seqs] == alone


def test_sampled_tree_rounds_are_reproducible_under_a_seed(target, draft):
    hot = SamplingParams(temperature=0.9, top_p=0.95, seed=3)

    def run():
        drafter = TreeDrafter(draft, 3, 8, capacity=CAPACITY)
        return Engine(LocalTarget(target, capacity=CAPACITY), drafter, lambda: FixedK(3)).generate(
            Request(PROMPT, 30, hot)).generated

    assert run() == run()


# -- suffix ------------------------------------------------------------------------------------------------------

def test_best_paths_merges_continuations_by_how_often_they_occur():
    tokens, parents, shares = best_paths([[1, 2, 3], [1, 2, 4], [1, 5], [7]], budget=5, min_prob=0.1)
    # 1 (3 of 4 continuations), 2 (2 of 4), then the singles shallowest first: 7, 5, then 3 before 4 (seen first)
    assert tokens == [1, 2, 7, 5, 3] and parents == [-1, 0, -1, 0, 1]
    assert shares == [0.75, 0.5, 0.25, 0.25, 0.25]
    tokens, parents, _ = best_paths([[1, 2, 3], [1, 2, 4], [1, 5], [7]], budget=5, min_prob=0.5)
    assert tokens == [1, 2] and parents == [-1, 0]  # only continuations at least half the matches share


def test_suffix_drafts_what_followed_the_longest_match():
    drafter = SuffixDrafter(SuffixOptions(pool="off", max_nodes=4, spec_factor=4))
    context = [10, 11, 12, 13, 14, 99, 11, 12, 13, 14, 50, 12, 13]
    drafter.prefill(0, context[:-1])
    draft = drafter.propose([DraftRequest(0, context, 8, SamplingParams(), None)])[0]
    # "12 13" occurs twice before, each time after 11 (not 50): two matches of length 2, both followed by 14, then
    # 99 or 50: one tree, the shared 14 first
    assert draft.tokens[0] == 14 and draft.parents[0] == -1
    assert {t for t, parent in zip(draft.tokens, draft.parents) if parent == 0} == {50, 99}
    assert len(draft.tokens) == 4  # max_nodes: the fourth is the next token of one continuation


def test_suffix_is_lossless_with_and_without_its_pool_and_the_pool_changes_speed_only(target):
    prompts = [PROMPT, PROMPT[:6] + [40, 41], [7, 8, 9, 10, 11, 12, 13], PROMPT]
    alone = [plain(target, p, max_tokens=30) for p in prompts]

    def serve(options: SuffixOptions) -> tuple[list[list[int]], list]:
        engine = Engine(LocalTarget(target, capacity=CAPACITY), SuffixDrafter(options), lambda: FixedK(options.k))
        outs = [engine.generate(Request(p, 30)) for p in prompts]
        return [o.generated for o in outs], [o.stats for o in outs]

    empty, empty_stats = serve(SuffixOptions(pool="off"))
    pooled, pooled_stats = serve(SuffixOptions(pool="shared"))
    assert empty == pooled == alone
    # the last prompt repeats the first: with the pool it drafts the earlier output and needs fewer rounds
    assert pooled_stats[3].rounds < empty_stats[3].rounds


def test_a_request_gives_the_same_output_with_a_pool_full_of_other_text(target):
    full = SuffixDrafter(SuffixOptions(pool="shared", pool_tokens=4096))
    g = torch.Generator().manual_seed(0)
    for i in range(20):  # other clients' text
        full.pool.add(torch.randint(0, 256, (150,), generator=g).tolist())
    full.pool.add(PROMPT + plain(target, PROMPT, max_tokens=10) + [1, 2, 3, 4] * 5)  # close to but not the output
    empty = SuffixDrafter(SuffixOptions(pool="shared"))
    outs = [Engine(LocalTarget(target, capacity=CAPACITY), d, lambda: FixedK(8)).generate(Request(PROMPT, 40))
            for d in (full, empty)]
    assert outs[0].generated == outs[1].generated == plain(target)


def test_the_suffix_pool_stays_within_its_token_bound():
    drafter = SuffixDrafter(SuffixOptions(pool_tokens=1000))
    for i in range(30):
        drafter.pool.add(list(range(i, i + 100)))
    report = drafter.report()
    assert report["pool_tokens"] <= 1000 and report["pool_requests"] == 10


def test_suffix_and_tree_requests_batched_by_the_async_scheduler_equal_each_alone(target, draft):
    prompts = [[5 + i, 9, 17, 5, 9, 33 + 2 * i, 80][: 3 + i % 5] for i in range(8)]
    alone = [plain(target, p, max_tokens=15) for p in prompts]
    for drafter, k in ((SuffixDrafter(SuffixOptions()), 8), (TreeDrafter(draft, 2, 6, 8, CAPACITY), 4)):
        engine = Engine(LocalTarget(target, 8, CAPACITY), drafter, lambda: FixedK(k))

        async def run_all():
            scheduler = AsyncScheduler(engine, max_running=8)
            await scheduler.start()
            try:
                handles = [scheduler.submit(Request(p, 15)) for p in prompts]
                return [[t async for chunk in h for t in chunk] for h in handles]
            finally:
                await scheduler.stop()

        assert asyncio.run(run_all()) == alone


# -- bad options --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,says", [
    (lambda: TreeOptions(max_nodes=0), "max_nodes"),
    (lambda: TreeOptions(k=9), "k"),
    (lambda: TreeOptions(k=6, max_nodes=4), "strategy.max_nodes"),
    (lambda: TreeOptions(k=8, branching=4), "strategy.branching"),
    (lambda: SuffixOptions(max_nodes=17), "max_nodes"),
    (lambda: SuffixOptions(min_match=8, max_match=4), "strategy.min_match"),
    (lambda: SuffixOptions(pool="everyone"), "pool"),
    (lambda: RasdOptions(k=2, draft_depth=3), "strategy.draft_depth"),
    (lambda: RasdOptions(branching=8, draft_depth=4), "strategy.branching"),
    (lambda: RasdOptions(max_nodes=0), "max_nodes"),
])
def test_bad_tree_options_are_refused_naming_the_option(make, says):
    with pytest.raises((ValidationError, ValueError), match=says):
        make()


# -- sizing a tree to the verify cost -----------------------------------------------------------------------------

def test_verify_cost_fills_unmeasured_row_counts_from_below():
    cost = VerifyCost()
    assert cost.table() is None
    cost.observe(1, 0.040)
    cost.observe(4, 0.050)
    table = cost.table()
    assert len(table) == MAX_VERIFY_ROWS
    assert table[:5] == (0.040, 0.040, 0.040, 0.050, 0.050)  # rows 2 and 3 as rows 1; rows 5+ as rows 4
    assert cost.table(offset=3)[0] == 0.050  # a sequence beside 3 others' rows starts at 4 rows
    cost.observe(4, 0.060)
    assert cost.table()[3] == pytest.approx(0.052)  # a moving average


def test_tree_budget_verifies_what_pays_for_its_rows():
    flat = tuple([0.04] * MAX_VERIFY_ROWS)
    cliff = tuple([0.04] * 6 + [0.12] * (MAX_VERIFY_ROWS - 6))  # 7 rows and more: three times the cost
    budget = TreeBudget()
    chain = [1.0] * 8
    depths = list(range(1, 9))
    assert budget.size(chain, depths, None, 0.0) == 8  # nothing measured yet: every node
    assert budget.size(chain, depths, flat, 0.0) == 8
    assert budget.size(chain, depths, cliff, 0.0) == 5  # 5 nodes + the pending token fit below the cliff
    assert budget.size([0.9, 0.2, 0.01], [1, 2, 3], tuple(0.04 + 0.01 * i for i in range(MAX_VERIFY_ROWS)),
                       0.0) == 1  # unlikely nodes are not worth a row each


def test_tree_budget_calibrates_each_depth_by_what_was_accepted():
    budget = TreeBudget()
    for _ in range(20):  # the drafter says 0.9 at depth 2, but depth 2 is never accepted
        budget.record(0, 3, [7, 8], [-1, 0], [0.9, 0.9])
        budget.settle(0, [1, 2, 3, 7, 5])
    assert budget.realised[1] / budget.predicted[1] > 0.9
    assert budget.realised[2] / budget.predicted[2] < 0.1
    cost = tuple(0.04 + 0.005 * i for i in range(MAX_VERIFY_ROWS))
    assert budget.size([0.9, 0.9], [1, 2], cost, 0.0) == 1


def test_a_seeded_sampled_request_is_not_told_the_verify_cost(target):
    """Its draft must not be shaped by timing: a seed fixes its tokens whatever the load."""
    engine = Engine(LocalTarget(target, 2, CAPACITY), SuffixDrafter(SuffixOptions()), lambda: FixedK(8))
    seeded = engine.add(Request(PROMPT, 20, SamplingParams(temperature=0.8, seed=1)))
    greedy = engine.add(Request(PROMPT, 20))
    engine.step([seeded, greedy])
    asked = engine.draft_requests([seeded, greedy], [8, 8])
    assert asked[0].verify_seconds is None and asked[1].verify_seconds is not None


# -- rasd ---------------------------------------------------------------------------------------------------------

def test_fusion_keeps_every_draft_and_retrieved_path_once():
    tree = _Fused([5, 6, 7], [-1, 0, -1], [0.6, 0.4, 0.3])  # the draft: 5 → 6, and 7
    tree.graft([5, 9, 6, 8], [-1, 0, 0, 2], [0.9, 0.5, 0.4, 0.4])  # retrieved: 5 → 9, 5 → 6 → 8
    paths = {tuple(tree.tokens[a] for a in reversed(_ancestry(tree.parents, i))) for i in range(len(tree.tokens))}
    assert paths == {(5,), (5, 6), (7,), (5, 9), (5, 6, 8)}
    assert len(tree.tokens) == 5  # 5 and 5 → 6 were merged, not duplicated
    assert tree.scores[0] == 0.9  # a node both sources propose takes the better estimate
    assert all(tree.scores[i] <= tree.scores[p] for i, p in enumerate(tree.parents) if p >= 0)
    tokens, parents, _ = tree.ranked(3)
    assert len(tokens) == 3 and all(p < i for i, p in enumerate(parents))


def _ancestry(parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out


def corpus_of(tokens: list[int], target: str = "tiny") -> Corpus:
    return Corpus(np.array(tokens, dtype=np.int32), 2, target, 256)


def test_a_corpus_finds_the_latest_longest_matches():
    corpus = corpus_of([1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 2, 3, 4, 7])
    found = corpus.matches([0, 1, 2, 3, 4], max_match=8)
    assert sorted(found, key=lambda m: -m[1]) == [(3, 13), (4, 9), (4, 4)]  # "2 3 4" last, "1 2 3 4" twice before
    assert corpus.after(9, 3) == [8, 2, 3]


# prune_top: the unrelated tiny draft would rule most retrieved text out (that it can is the point of pruning)
@pytest.mark.parametrize("options", [RasdOptions(pool="off", prune_top=300), RasdOptions(branching=2, prune_top=300),
                                     RasdOptions(confident_match=2, max_nodes=6, prune_top=300)],
                         ids=["own-text", "wider-draft-tree", "retrieval-carries-rounds"])
def test_rasd_is_lossless_with_a_corpus_and_both_caches_stay_exact(target, reference, draft, options, tmp_path):
    path = tmp_path / "corpus.npz"
    corpus_of(PROMPT * 3 + reference[:20] + list(range(60, 120))).save(path)  # text that partly predicts the output
    options = options.model_copy(update={"corpus": str(path)})
    drafter = RasdDrafter(draft, options, capacity=CAPACITY)
    _, seq = decode_checking_both_caches(target, drafter, options.k)
    assert seq.generated == reference
    assert drafter.report()["retrieved_rate"] > 0 and drafter.report()["corpus_tokens"] == 3 * len(PROMPT) + 80


def test_rasd_through_its_method_beats_the_draft_alone_on_copied_text(target):
    """The output repeats text in the corpus: retrieval drafts it where the unrelated draft model cannot."""
    reference = plain(target, max_tokens=40)
    env = in_process(target, tiny_model("llama", seed=7))
    drafter = RasdDrafter(tiny_model("llama", seed=7), RasdOptions(fit_cost=False, prune_top=300), capacity=CAPACITY)
    drafter.retriever.corpus = corpus_of(PROMPT + reference)
    with_retrieval = Engine(LocalTarget(target, capacity=CAPACITY), drafter, lambda: FixedK(8)).generate(
        Request(PROMPT, 40))
    parts = METHODS["tree"].parts(TreeOptions(k=3, branching=1, max_nodes=3), env)
    alone = Engine(env.target, parts.drafter, parts.policy).generate(Request(PROMPT, 40))
    assert with_retrieval.generated == alone.generated == reference
    assert with_retrieval.stats.rounds < alone.stats.rounds


def test_a_corpus_for_another_target_or_no_corpus_at_all_is_refused(tmp_path):
    path = tmp_path / "corpus.npz"
    corpus_of([1, 2, 3, 4], target="other-model").save(path)
    with pytest.raises(ValueError, match="strategy.corpus: tokenized for 'other-model'"):
        profile_from_args(parse(["--target", "tiny-target"]), RasdOptions(corpus=str(path)))
    with pytest.raises(ValueError, match="strategy.corpus: .* does not exist"):
        profile_from_args(parse(["--target", "tiny-target"]), RasdOptions(corpus=str(tmp_path / "missing.npz")))
    (tmp_path / "junk.npz").write_bytes(b"not a corpus")
    with pytest.raises(ValueError, match="strategy.corpus: .* is not a corpus file"):
        profile_from_args(parse(["--target", "tiny-target"]), RasdOptions(corpus=str(tmp_path / "junk.npz")))



def test_retrieved_text_the_draft_rules_out_is_pruned(draft):
    drafter = RasdDrafter(draft, RasdOptions(pool="off", prune_top=1, prune_prob=1.0), capacity=CAPACITY)
    context = [10, 11, 12, 13, 14, 99, 11, 12, 13, 15, 50, 12, 13]  # "12 13" was followed by 14, and by 15
    root = torch.full((draft.config.vocab_size,), -10.0)
    root[15] = 5.0  # the draft's most probable next token
    confident, kept = drafter._retrieve(DraftRequest(0, context, 8, SamplingParams(), None), root)
    assert kept == [[15, 50, 12, 13]] and not confident  # 14 ... is ruled out; a 2-token match carries nothing
