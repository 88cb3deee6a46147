"""The static-shape steps that CUDA graphs capture, run eagerly on the CPU: they compute the model's logits, a
position's logits do not depend on the rows scored beside it (so speculative greedy output equals plain decoding
through them), rollback is a length, and the graph seams drive the engine's one loop losslessly.
The capture itself needs a GPU: `outrider bench gpu` runs it there."""
from __future__ import annotations

import pytest
import torch
from conftest import PROMPT as SHORT
from conftest import tiny_model

from outrider.runtime.batch import ForwardBatch
from outrider.runtime.graphs import DraftLoop, StaticRunner
from outrider.scheduler.drafters import ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.graphed import GraphDrafter, GraphTarget
from outrider.scheduler.policy import FixedK

PROMPT = SHORT + [40, 41, 9, 17, 5]  # 15 tokens: a full 8-row chunk and more

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def target():
    return tiny_model("qwen2", seed=0)


def test_static_step_computes_the_models_logits(target):
    runner = StaticRunner(target, width=8, capacity=64)
    cache = target.new_cache(1, 64)
    for chunk in (PROMPT[:8], PROMPT[8:11], PROMPT[11:12]):
        start = runner.length
        got = runner.run(chunk)
        runner.commit(start + len(chunk))
        want = target.forward(ForwardBatch.chain([0], [chunk], [start]), cache).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_positions_logits_do_not_depend_on_the_rows_beside_it(target):
    runner = StaticRunner(target, width=8, capacity=64)
    runner.run(PROMPT[:8])
    runner.commit(8)
    alone = runner.run([PROMPT[8]])[0]
    for others in ([5, 6, 7], [1] * 7, [PROMPT[9]]):
        assert torch.equal(runner.run([PROMPT[8]] + others)[0], alone)


def test_a_tree_row_sees_only_its_ancestors(target):
    runner = StaticRunner(target, width=8, capacity=64)
    runner.run(PROMPT[:6])
    runner.commit(6)
    # Root a with two children b, c (both at depth 1): c must not see b.
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    rows = runner.run([3, 4, 5], tree=tree, depth=[0, 1, 1])
    chain = runner.run([3, 5])
    assert torch.allclose(rows[2], chain[1], atol=1e-4)


def test_rollback_is_a_length(target):
    runner = StaticRunner(target, width=8, capacity=64)
    runner.run(PROMPT[:5])
    runner.commit(5)
    first = runner.run([7, 8, 9]).clone()
    runner.commit(8)
    runner.run([1, 2])  # rows written past 8, then rolled back
    runner.commit(5)
    assert torch.equal(runner.run([7, 8, 9]), first)


def test_the_draft_loop_drafts_what_greedy_steps_draft(target):
    loop_runner, step_runner = StaticRunner(target, 8, 64), StaticRunner(target, 8, 64)
    step_runner.run(PROMPT[:6])
    step_runner.commit(6)
    want = []
    token = int(step_runner.run([PROMPT[6]])[0].argmax())
    step_runner.commit(7)
    for _ in range(4):
        want.append(token)
        token = int(step_runner.run([token])[0].argmax())
        step_runner.commit(step_runner.length + 1)
    loop = DraftLoop(loop_runner)
    loop_runner.fill(PROMPT[:7], None, None)
    loop.fed.fill_(7)
    assert loop.round(4).tolist() == want


@pytest.mark.parametrize("k", [1, 3, 7])
def test_speculative_decoding_through_the_graph_seams_equals_plain_decoding(target, k):
    plain = Engine(GraphTarget(target, capacity=128)).generate(Request(PROMPT, 30)).generated
    draft = tiny_model("qwen2", seed=1)
    for drafter in (GraphDrafter(draft, capacity=128), GraphDrafter(target, capacity=128),
                    ModelDrafter(draft, capacity=128)):
        seq = Engine(GraphTarget(target, capacity=128), drafter, lambda: FixedK(k)).generate(Request(PROMPT, 30))
        assert seq.generated == plain
        assert seq.stats.draft_tokens > 0
    # The draft equal to the target is accepted whole: its loop drafts exactly the target's greedy tokens.
    seq = Engine(GraphTarget(target, capacity=128), GraphDrafter(target, capacity=128),
                 lambda: FixedK(k)).generate(Request(PROMPT, 30))
    assert seq.stats.accepted_tokens == seq.stats.draft_tokens


def test_graph_slots_are_reused_and_long_prompts_prefill_in_chunks(target):
    graph_target = GraphTarget(target, num_slots=2, capacity=128)
    engine = Engine(graph_target, GraphDrafter(target, num_slots=2, capacity=128), lambda: FixedK(3))
    long_prompt = PROMPT * 3
    first = engine.generate(Request(long_prompt, 12)).generated
    assert engine.generate(Request(long_prompt, 12)).generated == first
    assert graph_target.slots_in_use() == [0]


def test_a_sequence_past_the_capacity_is_refused(target):
    runner = StaticRunner(target, width=8, capacity=16)
    runner.commit(14)
    with pytest.raises(ValueError, match="cache holds 16"):
        runner.run([1, 2, 3])
