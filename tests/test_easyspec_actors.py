"""EasySpec's layer groups split across two draft actors (gloo), through real Ray actors: the drafts, their q rows
and the draft K/V are bitwise those of the in-process `LayerParallelDrafter`; calibration makes the committed
K/V an exact recompute's; greedy output through the engine equals plain decoding; a cancel frees the slot in
every group actor; profiles with N draft stages are validated."""
from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch
from pydantic import ValidationError
from tiny_folders import write_tiny_folder

from outrider.actors.draft_groups import ActorGroupDrafter, DraftShard
from outrider.actors.worker import ModelSource, from_wire
from outrider.methods.easyspec.drafter import LayerParallelDrafter
from outrider.methods.easyspec.sharded import Sharded
from outrider.profile import Profile
from outrider.runtime.batch import ForwardBatch
from outrider.runtime.loading import load_model
from outrider.scheduler.drafters import DraftRequest
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget
from outrider.service import Service

pytestmark = pytest.mark.timeout(240)  # actors that never answer fail the test instead of hanging it

PROMPTS = [[70 + i, 71, 72, 267, 276, 10 + i][: 2 + i % 5] for i in range(8)]
MAX_TOKENS = [10 + 2 * (i % 4) for i in range(8)]
SLOTS, CAPACITY = 8, 256


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 4-layer target and a 4-layer draft (two groups of two: layers 0, 2 on actor 0 and 1, 3 on actor 1)."""
    root = tmp_path_factory.mktemp("groups")
    return write_tiny_folder(root / "target", seed=1, layers=4), write_tiny_folder(root / "draft", seed=1, layers=4)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def profile_dict(folders, draft_stages: int = 2, num_cpus: float = 1, **strategy) -> dict:
    target, draft = folders
    spec = {"weights": "dense", "dtype": "float32"}
    return {"name": "test-easyspec-groups",
            "models": {"target": {"model": str(target), **spec}, "draft": {"model": str(draft), **spec}},
            "placement": {"target": [{"device": "cpu"}],
                          "draft": [{"device": "cpu", "num_cpus": num_cpus}] * draft_stages},
            "strategy": {"name": "easyspec", "k": 3, "draft_group": draft_stages} | strategy,
            "scheduler": {"max_running": SLOTS, "max_seq_len": CAPACITY, "max_tokens": 64,
                          "speculation_gate": False}}


@pytest.fixture(scope="module")
def service(folders, cluster):
    s = Service.start(Profile.model_validate(profile_dict(folders)))
    yield s
    s.shutdown()


def in_process_drafter(folders, group_size: int = 2, variant: str = "attention",
                       dtype: str = "float32") -> LayerParallelDrafter:
    model, _ = load_model(str(folders[1]), dtype, "dense", batch_invariant=False)
    return LayerParallelDrafter(model, SLOTS, CAPACITY, group_size=group_size, variant=variant)


def actor_kv(drafter: ActorGroupDrafter, seq_id: int,
             dtype: torch.dtype = torch.float32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's K/V of a sequence, gathered from the group actors: [kv_heads, length, head_dim] each."""
    found = {}
    for part in ray.get([a.kv.remote(seq_id) for a in drafter.actors]):
        found |= {i: (from_wire(k, dtype), from_wire(v, dtype)) for i, (k, v) in part.items()}
    return found


def exact_kv(model, tokens: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """A fresh sequential forward over tokens."""
    cache = model.new_cache(1, CAPACITY)
    model.forward(ForwardBatch.chain([0], [tokens], [0]), cache, torch.empty(0, dtype=torch.long))
    n = len(tokens)
    return {i: (cache.keys[i][0, :, :n], cache.values[i][0, :, :n]) for i in range(model.num_layers)}


def check_bitwise(remote: ActorGroupDrafter, local: LayerParallelDrafter) -> None:
    """Seeded sampled drafts (so q rows come back too) over rounds that accept 0, 1, 2 drafts: tokens, q and
    every K/V position equal the in-process drafter's; the committed prefix equals an exact recompute, the
    fuzzy rows do not."""
    params = SamplingParams(temperature=0.9, seed=5)
    g_remote, g_local = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    committed = [70, 71, 72, 267, 276, 11]
    remote.prefill(0, committed[:-1])
    local.prefill(0, committed[:-1])
    for round_ in range(5):
        a = remote.propose([DraftRequest(0, list(committed), 3, params, g_remote)])[0]
        b = local.propose([DraftRequest(0, list(committed), 3, params, g_local)])[0]
        assert a.tokens == b.tokens and torch.equal(a.probs, b.probs), round_
        kv, mine = actor_kv(remote, 0, local.model.dtype), local.cache
        slot, n = local.seqs[0].slot, local.cache.lengths[local.seqs[0].slot]
        assert sorted(kv) == [0, 1, 2, 3] and all(k.shape[1] == n for k, _ in kv.values())
        for i, (k, v) in kv.items():  # every position, the fuzzy ones included
            assert torch.equal(k, mine.keys[i][slot, :, :n]) and torch.equal(v, mine.values[i][slot, :, :n])
        exact, fuzzy_rows = exact_kv(local.model, committed + a.tokens[:-1]), slice(len(committed), n)
        atol = 1e-5 if local.model.dtype == torch.float32 else 2e-2
        for i, (k, _) in kv.items():  # calibrated: the committed prefix is exact (up to the chunking's rounding)
            assert torch.allclose(k[:, :len(committed)], exact[i][0][:, :len(committed)], atol=atol)
        assert not all(torch.allclose(k[:, fuzzy_rows], exact[i][0][:, fuzzy_rows], atol=1e-3)
                       for i, (k, _) in kv.items())  # members after the first read the wrong input when fuzzy
        committed += a.tokens[:round_ % 3] + [40 + round_]  # accept 0, 1, 2 drafts, then a recovered token
    assert g_remote.get_state().equal(g_local.get_state())
    remote.release(0)
    local.release(0)


def test_the_group_actors_draft_bitwise_what_the_in_process_drafter_drafts(service, folders):
    remote = service.placed.drafter
    assert isinstance(remote, ActorGroupDrafter) and ray.get(remote.actors[1].info.remote())["layers"] == [1, 3]
    check_bitwise(remote, in_process_drafter(folders))
    timers = ray.get(remote.actor.info.remote())["timers"]
    assert timers["fuzzy_steps"] == 10 and timers["calibration_passes"] == 5


@pytest.mark.parametrize("variant,world,dtype", [("layer", 2, "float32"), ("attention", 3, "float32"),
                                                 ("layer", 3, "float32"), ("attention", 2, "bfloat16")])
def test_every_variant_and_width_is_bitwise_the_in_process_drafter(folders, cluster, variant, world, dtype):
    """Three actors over four layers: groups [0 1 2] [3], so a short group and a one-layer group (rank 0's).
    bf16 (the served dtype) crosses gloo as its bytes."""
    source = ModelSource(str(folders[1]), dtype, "dense", "cpu", batch_invariant=False)
    actors = [ray.remote(DraftShard).options(num_cpus=0.5).remote(source, SLOTS, CAPACITY, 1, Sharded(variant), rank,
                                                                  world) for rank in range(world)]
    try:
        remote = ActorGroupDrafter(actors, overlap_prefill=False, timeout_s=60)
        check_bitwise(remote, in_process_drafter(folders, world, variant, dtype))
        assert remote.slots_per_actor() == [0] * world
    finally:
        for a in actors:
            ray.kill(a)


def generate_all(service: Service, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list[list[int]]:
    async def go():
        async with service:
            done = await asyncio.gather(*[service.complete(p, n, stop_ids=frozenset())
                                          for p, n in zip(prompts, max_tokens)])
        return [c.token_ids for c in done]

    return asyncio.run(go())


def test_greedy_output_through_the_group_actors_equals_plain_decoding(service, folders):
    model, _ = load_model(str(folders[0]), "float32", "dense")
    plain = [Engine(LocalTarget(model, 1, CAPACITY)).generate(Request(p, n)).generated
             for p, n in zip(PROMPTS, MAX_TOKENS)]
    before = ray.get(service.placed.drafter.actor.info.remote())["timers"]["fuzzy_steps"]
    assert generate_all(service) == plain
    after = ray.get(service.placed.drafter.actor.info.remote())["timers"]["fuzzy_steps"]
    assert after > before  # the drafts really went through the group actors
    assert service.placed.drafter.slots_per_actor() == [0, 0]
    assert service.kv_slots_in_use() == {"target": [0], "draft": 0}


def test_cancel_frees_the_slot_in_every_group_actor(service):
    drafter = service.placed.drafter

    async def go():
        async with service:
            handle = service.submit(service.request(PROMPTS[3], 60, stop_ids=frozenset()))
            await handle.__aiter__().__anext__()
            assert drafter.slots_per_actor() == [1, 1]  # the follower holds the sequence's slot too
            handle.cancel()
            deadline = time.monotonic() + 10
            while drafter.slots_per_actor() != [0, 0]:
                assert time.monotonic() < deadline, drafter.slots_per_actor()
                await asyncio.sleep(0.01)
            return handle

    handle = asyncio.run(go())
    assert handle.finish_reason == "abort" and len(handle.token_ids) < 60


def test_a_request_past_the_draft_capacity_fails_on_the_leader_and_the_group_keeps_working(service):
    """The leader refuses before telling the followers anything, so they end their call cleanly and the
    group goes on drafting (the failed call drops every sequence, as any failed draft call does)."""
    drafter = service.placed.drafter
    drafts = drafter.propose([DraftRequest(9, [70] * (CAPACITY + 1), 2, SamplingParams(), None)])
    assert drafts[0].tokens == []  # a failed draft call gives no drafts: plain decoding, lossless
    deadline = time.monotonic() + 20
    while not drafter.recovery.ready():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(drafter.propose([DraftRequest(10, [70, 71, 72], 2, SamplingParams(), None)])[0].tokens) == 2
    drafter.release(9), drafter.release(10)


# -- profiles ----------------------------------------------------------------------------------------------------

def test_profiles_with_several_draft_stages_are_validated(folders):
    assert Profile.model_validate(profile_dict(folders, 3)).placement.draft_backend == "gloo"
    cases = [
        (profile_dict(folders, 2) | {"strategy": {"name": "vanilla"}}, "only strategy easyspec splits the draft"),
        (profile_dict(folders, 2, draft_group=3), "strategy.draft_group: 3, but placement.draft has 2 stages"),
        (profile_dict(folders, 2) | {"placement": {"draft": [{"layers": [0, 2]}, {"layers": [2, 4]}]}},
         r"placement.draft\[0\].layers: easyspec's draft stage j hosts member j of every layer group"),
        (profile_dict(folders, 2) | {"placement": {"mode": "local", "draft": [{}, {}]}}, "set mode: ray"),
        (profile_dict(folders, 2) | {"placement": {"draft": [{}, {}], "draft_backend": "nccl"}},
         r"draft_backend: nccl joins draft group actors on GPUs, but placement.draft\[0\].device is auto"),
    ]
    for data, message in cases:
        with pytest.raises(ValidationError, match=message):
            Profile.model_validate(data)
    nccl = profile_dict(folders, 2) | {"placement": {"draft": [{"device": "cuda:0"}, {"device": "cuda:1"}],
                                                     "draft_backend": "nccl"}}
    nccl["models"]["draft"]["weights"] = "dense"
    assert Profile.model_validate(nccl).placement.draft_backend == "nccl"  # the switch; untested on GPUs here


def test_a_draft_with_fewer_layers_than_group_actors_is_refused_at_load(folders, cluster):
    with pytest.raises(RuntimeError, match="has 4 layers, too few to split over 5 draft group actors"):
        Service.start(Profile.model_validate(profile_dict(folders, 5, num_cpus=0.5)))  # beside `service`'s
