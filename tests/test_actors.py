"""Models in Ray actors: the same engine over actors gives token-identical output to the in-process engine, for
whole models and for layer-split stages, greedy and seeded sampling; cancelling frees the actors' KV; a profile
the cluster cannot hold fails at once, naming the resource."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import ray
import torch
from tiny_folders import write_tiny_pair

from outrider.actors.worker import DraftWorker, ModelSource, ModelWorker, from_wire
from outrider.methods import METHODS
from outrider.profile import Profile
from outrider.runtime.batch import ForwardBatch, TreeRows
from outrider.runtime.loading import load_model
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget
from outrider.service import Service

PROMPTS = [[70 + i, 71, 72, 267, 276, 10 + i][: 2 + i % 5] for i in range(16)]
MAX_TOKENS = [10 + 2 * (i % 5) for i in range(16)]
SPLIT = [{"device": "cpu", "layers": [0, 1]}, {"device": "cpu", "layers": [1, 4]}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def profile(pair, mode: str, target_stages=None, transport: str = "ray", **scheduler) -> Profile:
    target, draft = pair
    spec = {"weights": "dense", "dtype": "float32"}
    return Profile.model_validate({
        "name": f"test-{mode}",
        "models": {"target": {"model": str(target), **spec}, "draft": {"model": str(draft), **spec}},
        "placement": {"mode": mode, "target": target_stages or [{"device": "cpu"}], "transport": transport},
        "scheduler": {"max_running": 16, "max_seq_len": 256, "max_tokens": 64} | scheduler})


def generate_all(service: Service, params: list[SamplingParams]) -> list[list[int]]:
    async def go():
        async with service:
            done = await asyncio.gather(*[service.complete(p, n, q, stop_ids=frozenset())
                                          for p, n, q in zip(PROMPTS, MAX_TOKENS, params)])
        return [c.token_ids for c in done]

    return asyncio.run(go())


@pytest.fixture(scope="module")
def in_process(pair):
    model, _ = load_model(str(pair[0]), "float32", "dense")
    return [Engine(LocalTarget(model, 1, 256)).generate(Request(p, n)).generated
            for p, n in zip(PROMPTS, MAX_TOKENS)]


@pytest.mark.parametrize("stages,transport", [(None, "ray"), (SPLIT, "ray"), (SPLIT, "gloo")],
                         ids=["whole-model", "two-layer-stages", "two-stages-logits-over-gloo"])
def test_16_concurrent_requests_through_actors_equal_the_in_process_engine(pair, cluster, in_process, stages,
                                                                            transport):
    service = Service.start(profile(pair, "ray", stages, transport))
    try:
        assert generate_all(service, [SamplingParams()] * 16) == in_process
        assert service.kv_slots_in_use() == {"target": [0] * len(stages or [1]), "draft": 0}
    finally:
        service.shutdown()


def test_seeded_sampling_through_actors_equals_in_process(pair, cluster):
    params = [SamplingParams(temperature=0.8, top_k=40, seed=7 + i) for i in range(16)]
    local = Service.start(profile(pair, "local"))
    remote = Service.start(profile(pair, "ray"))
    try:
        assert generate_all(remote, params) == generate_all(local, params)
    finally:
        remote.shutdown()


def test_seeded_multi_drafts_through_actors_equal_in_process(pair, cluster):
    """Sampled draft trees with their q rows cross the actor wire: the same seeds give the same tokens."""
    params = [SamplingParams(temperature=1.0, seed=3 + i) for i in range(16)]
    options = METHODS["multi-draft"].Options(drafts=2, k=3, sampling="without-replacement")
    local = Service.start(profile(pair, "local", speculation_gate=False).model_copy(update={"strategy": options}))
    remote = Service.start(profile(pair, "ray", speculation_gate=False).model_copy(update={"strategy": options}))
    try:
        assert generate_all(remote, params) == generate_all(local, params)
    finally:
        remote.shutdown()
        local.shutdown()


def test_cancel_frees_the_actors_kv(pair, cluster):
    service = Service.start(profile(pair, "ray", max_running=2))

    async def go():
        async with service:
            handle = service.submit(service.request(PROMPTS[3], 60, stop_ids=frozenset()))
            await handle.__aiter__().__anext__()
            assert service.kv_slots_in_use() == {"target": [1], "draft": 1}
            handle.cancel()
            deadline = time.monotonic() + 10
            while service.kv_slots_in_use() != {"target": [0], "draft": 0}:
                assert time.monotonic() < deadline, service.kv_slots_in_use()
                await asyncio.sleep(0.01)
            return handle

    try:
        handle = asyncio.run(go())
        assert handle.finish_reason == "abort" and len(handle.token_ids) < 60
    finally:
        service.shutdown()


def test_a_profile_the_cluster_cannot_hold_fails_naming_the_resource(pair, cluster):
    with pytest.raises(RuntimeError, match="needs 1 GPU but the Ray cluster has 0; place the stages on cpu"):
        Service.start(profile(pair, "ray", [{"device": "cuda:0"}]))
    with pytest.raises(RuntimeError, match="needs 9 CPU but the Ray cluster has 8; lower placement"):
        Service.start(profile(pair, "ray", [{"device": "cpu", "num_cpus": 8}]))  # + 1 for the draft


# -- the workers themselves, in-process (no Ray) -------------------------------------------------------------

def source(pair) -> ModelSource:
    return ModelSource(str(pair[0]), "float32", "dense", "cpu")


def test_layer_stages_chained_give_the_whole_model_logits_bitwise(pair):
    whole = ModelWorker(source(pair), 2, 64)
    first, second = ModelWorker(source(pair), 2, 64, (0, 1)), ModelWorker(source(pair), 2, 64, (1, 4))
    for w in (whole, first, second):
        w.acquire()
        w.prefill(0, [70, 71, 72]) if w is whole else None
    second.prefill(0, [70, 71, 72], first.prefill(0, [70, 71, 72]))
    rows = [[267, 276, 10, 11]]
    expected = whole.score([0], rows)
    assert np.array_equal(second.score([0], rows, first.score([0], rows)), expected)
    assert first.length(0) == second.length(0) == whole.length(0) == 7


def test_calibrate_equals_a_fresh_prefill(pair):
    worker, fresh = ModelWorker(source(pair), 1, 64), ModelWorker(source(pair), 1, 64)
    worker.acquire(), fresh.acquire()
    worker.prefill(0, [70, 71, 72, 5, 6, 7])  # 5, 6, 7 were drafts the target rejected
    worker.calibrate(0, 3, [267, 276])
    fresh.prefill(0, [70, 71, 72, 267, 276])
    assert np.array_equal(worker.score([0], [[10]]), fresh.score([0], [[10]]))


def test_logits_travel_as_exact_bits():
    x = torch.randn(3, 7).bfloat16().float()
    wire = x.bfloat16().view(torch.int16).numpy()
    assert torch.equal(from_wire(wire, torch.bfloat16).float(), x)


def test_draft_worker_returns_the_advanced_random_stream(pair):
    worker = DraftWorker(ModelSource(str(pair[1]), "float32", "dense", "cpu", batch_invariant=False), 1, 64)  # a chain
    g = torch.Generator().manual_seed(3)
    reply = worker.propose([{"seq_id": 0, "tokens": [70, 71, 72], "k": 3,
                             "params": SamplingParams(temperature=1.0), "verify_seconds": None, "prompt_len": 1,
                             "rng": g.get_state().numpy()}])[0]
    assert len(reply["tokens"]) == 3 and reply["probs"].shape == (3, 300)
    assert not np.array_equal(reply["rng"], g.get_state().numpy())  # three draws were taken from it


def test_a_failed_call_over_the_gloo_link_falls_back_to_ray(pair, cluster, in_process):
    service = Service.start(profile(pair, "ray", transport="gloo"))
    try:
        target = service.engine.target
        slot = target.acquire()
        with pytest.raises(Exception, match="needs 300 KV positions but the cache holds 256"):
            target.score([slot], [[70] * 300])  # fails in the actor before anything is sent
        target.release(slot)
        assert target.link is None  # a half-used link could pair a stale receive with the next send
        assert generate_all(service, [SamplingParams()] * 16) == in_process
    finally:
        service.shutdown()


TREE = TreeRows(depths=[0, 1, 2, 1, 2],  # the pending token, then nodes 50 → 60 and 70 → 80 under it
                mask=np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]],
                              dtype=bool))
TREE_ROWS = [72, 50, 60, 70, 80]


def test_tree_verify_through_stage_actors_equals_the_in_process_model(pair, cluster):
    """Verify a draft tree over two layer-stage actors, keep the path 72 → 70 → 80, and check every logit
    bitwise against the model in this process (tree pass, then a chain after compaction)."""
    model, _ = load_model(str(pair[0]), "float32", "dense")
    cache = model.new_cache(1, 64)
    model.prefill(cache, 0, [70, 71])
    batch = ForwardBatch(torch.tensor(TREE_ROWS), torch.tensor([2 + d for d in TREE.depths]), [0], [5],
                         [torch.from_numpy(TREE.mask)])
    expected_tree = model.forward(batch, cache).logits
    cache.compact(0, 2, [0, 3, 4])
    expected_next = model.forward(ForwardBatch.chain([0], [[90]], [5]), cache).logits

    service = Service.start(profile(pair, "ray", SPLIT))
    try:
        target = service.engine.target
        slot = target.acquire()
        target.prefill(slot, [70, 71])
        assert torch.equal(target.score([slot], [TREE_ROWS], trees=[TREE])[0], expected_tree)
        target.compact(slot, 2, [0, 3, 4])
        assert target.length(slot) == 5
        assert torch.equal(target.score([slot], [[90]])[0], expected_next)
        target.release(slot)
    finally:
        service.shutdown()


def test_a_draft_with_another_vocabulary_is_refused_at_start(pair, cluster, tmp_path):
    import json

    from conftest import random_state, tiny_config
    from safetensors.torch import save_file

    cfg = tiny_config("llama")  # 256 tokens; the target has 300
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in random_state(cfg, 0).items()}, str(tmp_path / "model.safetensors"))
    bad = profile(pair, "ray").model_copy(update={"models": profile(pair, "ray").models.model_copy(update={
        "draft": profile(pair, "ray").models.draft.model_copy(update={"model": str(tmp_path)})})})
    with pytest.raises(ValueError, match="has a vocabulary of 256 tokens but the target .* has 300"):
        Service.start(bad)


def test_a_model_that_fails_to_load_in_its_actor_is_one_clear_error(pair, cluster, tmp_path):
    import shutil

    broken = tmp_path / "draft"
    shutil.copytree(pair[1], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # passes for a file, fails to parse in the actor
    p = profile(pair, "ray")
    bad = p.model_copy(update={"models": p.models.model_copy(update={
        "draft": p.models.draft.model_copy(update={"model": str(broken)})})})
    with pytest.raises(RuntimeError, match="an actor failed to load its model: .*model.safetensors"):
        Service.start(bad)
    wait = time.monotonic() + 20  # everything placed for it is gone again
    while ray.available_resources().get("CPU", 0) < 8:
        assert time.monotonic() < wait, ray.available_resources()
        time.sleep(0.1)


def test_pearl_through_actors_equals_the_in_process_engine(pair, cluster, in_process):
    """Overlapped rounds: the draft actor drafts the next block while the target actor verifies."""
    p = profile(pair, "ray", speculation_gate=False)
    service = Service.start(p.model_copy(update={"strategy": METHODS["pearl"].Options()}))
    try:
        assert generate_all(service, [SamplingParams()] * 16) == in_process
        assert service.kv_slots_in_use() == {"target": [0], "draft": 0}
    finally:
        service.shutdown()


def test_easyspec_with_its_layer_groups_in_the_draft_actor_equals_the_in_process_engine(pair, cluster, in_process):
    p = profile(pair, "ray", speculation_gate=False)
    strategy = METHODS["easyspec"].Options(draft_group=2)
    service = Service.start(p.model_copy(update={"strategy": strategy}))
    try:
        assert service.placed.drafter.info()["drafter"] == "LayerParallel(group_size=2, variant='attention')"
        assert generate_all(service, [SamplingParams()] * 16) == in_process
        assert service.kv_slots_in_use() == {"target": [0], "draft": 0}
    finally:
        service.shutdown()


@pytest.mark.parametrize("strategy", [{"name": "tree", "k": 4, "branching": 2, "max_nodes": 6},
                                      {"name": "suffix", "pool": "shared"},
                                      {"name": "multi-draft", "drafts": 3, "k": 3}],
                         ids=["tree", "suffix", "multi-draft"])
def test_tree_strategies_through_actors_equal_the_in_process_engine(pair, cluster, in_process, strategy):
    """Tree drafts through the actors: the draft tree in the draft actor (tree) or in this process (suffix), its
    nodes verified by the target actor under the tree mask, the accepted path compacted there."""
    p = profile(pair, "ray", speculation_gate=False)
    service = Service.start(p.model_copy(update={"strategy": METHODS[strategy["name"]].Options(**strategy)}))
    try:
        assert generate_all(service, [SamplingParams()] * 16) == in_process
        assert service.kv_slots_in_use() == {"target": [0], "draft": 0}
    finally:
        service.shutdown()


def test_a_draft_actor_masks_its_proposals_by_the_requests_grammar(pair, cluster):
    """The draft is the target's own weights: masked by the same grammar, its greedy proposals are exactly the
    target's constrained choices, so every draft is accepted. The grammar reaches the actor as its source."""
    from dataclasses import replace

    from outrider.scheduler.grammar import GrammarTokenizer

    target_only = (pair[0], pair[0])
    service = Service.start(profile(target_only, "ray", speculation_gate=False))
    try:
        tok = service.tokenizer
        grammar = GrammarTokenizer(tok.backend.to_str(), service.engine.target.vocab_size,
                                   tok.eos_token_ids).json_schema(
            {"type": "object", "required": ["a", "b"], "additionalProperties": False,
             "properties": {"a": {"enum": ["x", "yy"]}, "b": {"type": "boolean"}}})
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "JSON please"}]))
        request = Request(prompt, 40, stop_ids=frozenset(tok.eos_token_ids), grammar=grammar)
        out = service.engine.generate(request)
        assert json.loads(tok.decode(out.generated)).keys() == {"a", "b"}
        assert out.stats.draft_tokens > 0 and out.stats.accepted_tokens == out.stats.draft_tokens
        # control: the same actor drafting with the grammar's state withheld is rejected where the grammar bites
        drafter = service.engine.drafter
        propose = drafter.submit
        drafter.submit = lambda requests: propose([replace(r, guide=None) for r in requests])
        try:
            unmasked = service.engine.generate(request)
        finally:
            del drafter.submit
        assert unmasked.generated == out.generated and unmasked.stats.accepted_tokens < unmasked.stats.draft_tokens
    finally:
        service.shutdown()
