"""Greedy verification is exact: chains and trees keep exactly the drafts the target's argmax agrees with, then
emit the target's argmax. Also: the tree mask, the warp, and SamplingParams validation."""
from __future__ import annotations

import pytest
import torch

from outrider.scheduler.sampling import SamplingParams, sample, warp
from outrider.scheduler.verify import (
    DraftTree,
    point_mass,
    residual,
    verify_chain,
    verify_greedy,
    verify_tree,
)

GREEDY = SamplingParams()
VOCAB = 11


def _chain_case(k: int, num_matching: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random target logits [k+1, V] and drafts [k] whose first `num_matching` equal the target's argmax and
    whose next one (if any) does not. Returns (logits, drafts, argmax per row)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k + 1, VOCAB, generator=g)
    argmax = logits.argmax(-1).tolist()
    drafts = torch.randint(VOCAB, (k,), generator=g).tolist()
    drafts[:num_matching] = argmax[:num_matching]
    if num_matching < k:
        drafts[num_matching] = (argmax[num_matching] + 1 + seed % (VOCAB - 1)) % VOCAB  # a sure mismatch
    return logits, torch.tensor(drafts, dtype=torch.int64), argmax


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_chain_accepts_the_matching_prefix_then_emits_target_argmax(k: int) -> None:
    for num_matching in range(k + 1):  # zero, partial and full acceptance
        logits, drafts, argmax = _chain_case(k, num_matching, seed=100 * k + num_matching)
        expected = drafts[:num_matching].tolist() + [argmax[num_matching]]  # recovered, or bonus when == k

        fast = verify_greedy(logits, drafts)
        assert fast.num_accepted == num_matching
        assert fast.acceptance_length == num_matching + 1
        assert fast.tokens == expected

        p = warp(logits, GREEDY)  # one-hot target
        point = verify_chain(p, drafts, None, torch.Generator().manual_seed(k))  # n-gram / greedy-draft form
        one_hot_q = verify_chain(p, drafts, point_mass(drafts, VOCAB), torch.Generator().manual_seed(k))
        assert point == fast
        assert one_hot_q == fast


def test_greedy_chain_outcome_ignores_the_random_stream() -> None:
    logits, drafts, _ = _chain_case(6, 3, seed=7)
    p = warp(logits, GREEDY)
    sampled_q = torch.softmax(torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(8)), -1)
    for q in (None, sampled_q):  # even a sampled draft cannot move a greedy target
        results = {str(verify_chain(p, drafts, q, torch.Generator().manual_seed(s))) for s in range(20)}
        assert results == {str(verify_greedy(logits, drafts))}


def test_greedy_ties_break_to_the_lowest_index() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [2.0, 2.0, 0.0, 0.0]])
    assert warp(logits, GREEDY).argmax(-1).tolist() == [1, 0]
    assert verify_greedy(logits, torch.tensor([2])).tokens == [1]
    assert verify_greedy(logits, torch.tensor([1])).tokens == [1, 0]


def test_zero_drafts_yield_only_the_bonus_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert verify_greedy(logits, torch.zeros(0, dtype=torch.int64)).tokens == [1]
    assert verify_chain(warp(logits, GREEDY), torch.zeros(0, dtype=torch.int64), None, None).tokens == [1]


def test_residual_of_identical_distributions_is_guarded() -> None:
    p = torch.tensor([0.25, 0.75])
    assert torch.equal(residual(p, p), p)  # 0/0 would be NaN
    assert torch.equal(residual(p, point_mass(torch.tensor(1), 2)), torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------- trees

#   root ─┬─ 0 ─┬─ 2 ── 4
#         │     └─ 3
#         └─ 1 ── 5
EXAMPLE_PARENTS = [-1, -1, 0, 0, 2, 1]


def _tree(tokens: list[int], parents: list[int]) -> DraftTree:
    return DraftTree(tokens=torch.tensor(tokens, dtype=torch.int64), parents=torch.tensor(parents, dtype=torch.int64))


def test_tree_attention_mask_and_depths_worked_example() -> None:
    tree = _tree([5, 6, 7, 8, 9, 10], EXAMPLE_PARENTS)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [0, 1, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree.attention_mask(), expected)
    assert tree.depths().tolist() == [1, 1, 2, 2, 3, 2]
    assert tree.children() == [[0, 1], [2, 3], [5], [4], [], [], []]  # entry u + 1 lists node u's children


def test_tree_rejects_parents_out_of_topological_order() -> None:
    with pytest.raises(ValueError, match="topological order"):
        _tree([1, 2], [1, -1])


def _one_hot_rows(argmax: list[int], vocab: int = 12) -> torch.Tensor:
    return point_mass(torch.tensor(argmax), vocab)


@pytest.mark.parametrize(
    ("row_argmax", "path", "tokens"),
    [
        # rows: root, after node 0, .., after node 5. Tokens: node i carries token i + 1.
        ([1, 3, 0, 5, 0, 11, 0], [0, 2, 4], [1, 3, 5, 11]),  # deepest branch, then the bonus after leaf 4
        ([2, 3, 6, 5, 0, 0, 9], [1, 5], [2, 6, 9]),  # the second root child, then the bonus after leaf 5
        ([1, 9, 0, 5, 0, 11, 0], [0], [1, 9]),  # node 0 accepted, neither child matches: recovered 9
        ([7, 3, 0, 5, 0, 11, 0], [], [7]),  # nothing matches at the root: recovered 7
    ],
)
def test_greedy_tree_walks_the_path_matching_target_argmax(
    row_argmax: list[int], path: list[int], tokens: list[int]
) -> None:
    tree = _tree([1, 2, 3, 4, 5, 6], EXAMPLE_PARENTS)
    result = verify_tree(_one_hot_rows(row_argmax), tree, torch.Generator().manual_seed(0))
    assert (result.path, result.tokens) == (path, tokens)
    assert result.acceptance_length == len(path) + 1


def _longest_matching_path(tree: DraftTree, target_argmax: torch.Tensor) -> list[int]:
    """Independent reference (EAGLE's retrieve-indices style): a node is kept iff it and all its ancestors match
    the argmax of their parent's row; the deepest kept node ends the path."""
    matches = tree.tokens == target_argmax[tree.parents + 1]  # [n]
    mask = tree.attention_mask()  # [n, n] self + ancestors
    kept = (mask & ~matches.unsqueeze(0)).sum(-1) == 0  # no non-matching node on the way
    if not bool(kept.any()):
        return []
    deepest = int(torch.where(kept, tree.depths(), 0).argmax())
    return torch.nonzero(mask[deepest]).flatten().tolist()  # ancestors precede descendants: root → deepest


def _random_tree(n: int, vocab: int, g: torch.Generator) -> DraftTree:
    """A random tree in topological order whose siblings carry distinct tokens."""
    parents: list[int] = []
    tokens: list[int] = []
    for i in range(n):
        open_nodes = [u for u in range(-1, i) if parents.count(u) < vocab]  # room for one more child
        parent = open_nodes[int(torch.randint(len(open_nodes), (1,), generator=g))]
        taken = {t for t, par in zip(tokens, parents) if par == parent}
        free = [t for t in range(vocab) if t not in taken]
        parents.append(parent)
        tokens.append(free[int(torch.randint(len(free), (1,), generator=g))])
    return _tree(tokens, parents)


def test_greedy_tree_equals_longest_matching_path_on_random_trees() -> None:
    g = torch.Generator().manual_seed(1)
    vocab = 3  # small, so that matches are frequent
    for _ in range(200):
        n = int(torch.randint(1, 14, (1,), generator=g))
        tree = _random_tree(n, vocab, g)
        tokens = tree.tokens.tolist()
        logits = torch.randn(n + 1, vocab, generator=g)
        target_argmax = logits.argmax(-1)
        result = verify_tree(warp(logits, GREEDY), tree, torch.Generator().manual_seed(2))
        path = _longest_matching_path(tree, target_argmax)
        assert result.path == path
        after = path[-1] + 1 if path else 0
        assert result.tokens == [tokens[i] for i in path] + [int(target_argmax[after])]


def test_a_chain_shaped_tree_agrees_with_verify_chain_when_greedy() -> None:
    for k in range(1, 6):
        for num_matching in range(k + 1):
            logits, drafts, _ = _chain_case(k, num_matching, seed=k * 31 + num_matching)
            tree = DraftTree(tokens=drafts, parents=torch.arange(-1, k - 1))
            result = verify_tree(warp(logits, GREEDY), tree, None)
            assert result.tokens == verify_greedy(logits, drafts).tokens
            assert result.path == list(range(num_matching))


# --------------------------------------------------------------------------- sampling parameters and warp


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sampling_params_reject_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_are_greedy_and_seed_makes_a_generator() -> None:
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy
    assert SamplingParams().generator() is None
    a, b = SamplingParams(seed=3).generator(), SamplingParams(seed=3).generator()
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_warp_top_k_and_top_p_keep_the_expected_support() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    top2 = warp(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([[4 / 7, 3 / 7, 0, 0], [0, 0, 3 / 7, 4 / 7]]))
    nucleus = warp(logits, SamplingParams(temperature=1.0, top_p=0.65))  # 0.4 + 0.3 reaches 0.65
    assert torch.allclose(nucleus, top2)
    assert torch.equal(warp(logits, SamplingParams(temperature=1.0, top_p=0.05)) > 0,
                       torch.tensor([[True, False, False, False], [False, False, False, True]]))
    hot = warp(logits, SamplingParams(temperature=0.01))
    assert torch.allclose(hot, warp(logits, GREEDY), atol=1e-6)


def test_warp_is_per_row_and_float32() -> None:
    logits = torch.randn(5, 3, 17, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = SamplingParams(temperature=0.8, top_k=9, top_p=0.9)
    batch = warp(logits, params)
    assert batch.dtype == torch.float32
    assert torch.allclose(batch.sum(-1), torch.ones(5, 3))
    for i in range(5):
        assert torch.equal(batch[i, 1], warp(logits[i, 1], params))


def test_sample_honours_the_generator() -> None:
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(5)), -1)
    a = sample(probs, torch.Generator().manual_seed(9))
    b = sample(probs, torch.Generator().manual_seed(9))
    assert a.shape == (4,) and a.dtype == torch.int64 and torch.equal(a, b)
    assert sample(point_mass(torch.tensor([3, 0]), 6), None).tolist() == [3, 0]


def test_sample_never_picks_a_zero_probability_token_and_matches_the_masses():
    probs = torch.zeros(3, 12)
    probs[:, [0, 4, 5]] = torch.tensor([0.5, 0.25, 0.25])  # holes between, a zero tail after
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(probs, g) for _ in range(4000)]).flatten()
    counts = torch.bincount(draws, minlength=12).double() / draws.numel()
    assert set(draws.unique().tolist()) == {0, 4, 5}
    assert torch.allclose(counts[[0, 4, 5]], torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), atol=0.02)
