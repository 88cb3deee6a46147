"""Turn a profile's placement into Ray actors: one placement-group bundle per stage, one actor per bundle.

The bundle carries the stage's CPUs, one GPU for a `cuda` device, its custom resources and node labels, so Ray
refuses (and says why) a profile the cluster cannot hold instead of starting half of it. Inside an actor that
holds one GPU, Ray sets CUDA_VISIBLE_DEVICES, so the actor's device is always `cuda:0`: `cuda:N` in a profile
chooses "a GPU" for Ray placement and the exact device only in local mode.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from outrider.actors.draft_groups import ActorGroupDrafter, DraftShard
from outrider.actors.remote import ActorDrafter, ActorTarget
from outrider.actors.transport import GlooLink
from outrider.actors.worker import FAULT_ENV, DraftWorker, ModelSource, ModelWorker
from outrider.profile import ModelSpec, Profile, Stage

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120  # bound on placing and loading: a cluster that cannot hold the profile fails, not hangs


@dataclass
class Placed:
    """The actors of one profile and what the engine sees of them."""

    target: ActorTarget
    drafter: ActorDrafter | None
    group: object  # the placement group; removing it frees every bundle
    actors: list = field(default_factory=list)

    def shutdown(self) -> None:
        if self.target is not None and self.target.link is not None:
            self.target.link.close()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.group)


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` ($RAY_ADDRESS when None), or start a local one; idempotent."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 configure_logging=False)
    except ConnectionError as e:
        raise RuntimeError(f"cannot reach the Ray cluster at {address!r}: {e}. Start one with `ray start --head` "
                           "or unset RAY_ADDRESS to run a local one") from e


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a `host:port` nobody answers at: ray.init itself keeps retrying for minutes."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"RAY_ADDRESS {address!r} is not host:port (e.g. 127.0.0.1:6379) or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RuntimeError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}. Start one there with "
                           "`ray start --head`, fix RAY_ADDRESS, or unset it to run a local cluster") from None


def place(profile: Profile, num_slots: int, capacity: int, draft_model: bool) -> Placed:
    """Start the target stages and (if the strategy drafts with a model) the draft actor, all-or-nothing."""
    connect()
    stages = [("target", _resolve(s)) for s in profile.placement.target]
    if draft_model:  # one draft actor, or easyspec's group actors (one per draft stage)
        stages += [("draft", _resolve(s)) for s in profile.placement.draft]
    _check_feasible(profile, [_bundle(s) for _, s in stages])
    group = placement_group([_bundle(s) for _, s in stages], strategy="PACK",
                            bundle_label_selector=[dict(s.node_labels) for _, s in stages])
    if not group.wait(timeout_seconds=START_TIMEOUT_S):
        remove_placement_group(group)
        raise RuntimeError(f"the Ray cluster cannot hold profile {profile.name!r}: bundles "
                           f"{[_bundle(s) for _, s in stages]} were not placed within {START_TIMEOUT_S}s; "
                           "check `ray status` and the profile's num_cpus/resources/devices")
    actors = [_actor(profile, role, stage, group, i, num_slots, capacity) for i, (role, stage) in enumerate(stages)]
    try:
        timeout = profile.placement.call_timeout_s
        num_target = len(profile.placement.target)
        target = ActorTarget(actors[:num_target], timeout)  # waits for the models to load
        drafter = _drafter(profile, actors[num_target:], not _shares_cpu(stages)) if draft_model else None
        if profile.placement.transport == "gloo":
            target.link = GlooLink(target.stages[-1], target.vocab_size, target.dtype)
        if drafter:  # waits for the draft to load: a load error surfaces now, not at the first round
            from outrider.pipeline import check_vocabularies

            check_vocabularies(target.vocab_size, ray.get(drafter.actor.info.remote())["vocab_size"],
                               profile.models.target.model, profile.models.draft.model)
    except BaseException as e:
        Placed(None, None, group, actors).shutdown()  # type: ignore[arg-type]
        if isinstance(e, ray.exceptions.ActorDiedError):  # the constructor (model load) failed in the actor
            raise RuntimeError(f"profile {profile.name!r}: an actor failed to load its model: "
                               f"{_last_line(e)}") from None
        raise
    return Placed(target, drafter, group, actors)


def _last_line(error: BaseException) -> str:
    """The actor's own exception message: the last line of Ray's report (the rest is its traceback)."""
    lines = [line for line in getattr(error, "error_msg", str(error)).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _check_feasible(profile: Profile, bundles: list[dict[str, float]]) -> None:
    """Fail at once, naming the resource, when the whole cluster has less than the profile asks for (Ray would
    otherwise leave the placement group pending until the timeout)."""
    have = ray.cluster_resources()
    for resource in {r for b in bundles for r in b}:
        need = sum(b.get(resource, 0) for b in bundles)
        if need > have.get(resource, 0):
            fix = ("place the stages on cpu, or run on a cluster with GPUs" if resource == "GPU"
                   else "lower placement.target[*].num_cpus / placement.draft[*].num_cpus" if resource == "CPU"
                   else f"start a node with `ray start --resources '{{\"{resource}\": {need:g}}}'`")
            raise RuntimeError(f"profile {profile.name!r} needs {need:g} {resource} but the Ray cluster has "
                               f"{have.get(resource, 0):g}; {fix}")


def _shares_cpu(stages: list[tuple[str, Stage]]) -> bool:
    """Draft and target both computing on CPUs (of one node, as PACK places them when it can)."""
    return any(s.device == "cpu" for r, s in stages if r == "draft") and \
        any(s.device == "cpu" for r, s in stages if r == "target")


def _bundle(stage: Stage) -> dict[str, float]:
    bundle = {"CPU": stage.num_cpus, **stage.resources}
    if stage.device.startswith("cuda"):
        bundle["GPU"] = 1
    return {k: v for k, v in bundle.items() if v}


def _actor(profile: Profile, role: str, stage: Stage, group, index: int, num_slots: int, capacity: int):
    spec: ModelSpec = profile.models.target if role == "target" else profile.models.draft
    device = "cuda:0" if stage.device.startswith("cuda") else "cpu"
    source = ModelSource(spec.model, spec.dtype, spec.weights, device, capacity, role == "target")
    threads = stage.threads or max(1, int(stage.num_cpus))
    # max_task_retries stays 0 (at most once): a retried round could emit tokens twice; Remote callers recover.
    options = dict(num_cpus=stage.num_cpus, num_gpus=1 if device.startswith("cuda") else 0,
                   resources=dict(stage.resources) or None, max_concurrency=1,
                   max_restarts=profile.placement.max_restarts, max_task_retries=0,
                   scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index))
    if os.environ.get(FAULT_ENV) == "1":  # tests: the actors may be armed with faults too
        options["runtime_env"] = {"env_vars": {FAULT_ENV: "1"}}
    if role == "target":
        return ray.remote(ModelWorker).options(**options).remote(source, num_slots, capacity, stage.layers, threads)
    if _group_actors(profile):
        rank = index - len(profile.placement.target)
        return ray.remote(DraftShard).options(**options).remote(source, num_slots, capacity, threads, rank,
                                                                len(profile.placement.draft))
    return ray.remote(DraftWorker).options(**options).remote(source, num_slots, capacity, threads,
                                                             _layer_group(profile))


def _drafter(profile: Profile, actors: list, overlap_prefill: bool) -> ActorDrafter:
    timeout = profile.placement.call_timeout_s
    if _group_actors(profile):  # joins their torch.distributed group (waits for their models to load)
        return ActorGroupDrafter(actors, overlap_prefill, timeout, profile.placement.draft_backend)
    return ActorDrafter(actors[0], overlap_prefill, timeout, _layer_group(profile))


def _group_actors(profile: Profile) -> bool:
    """EasySpec's layer groups split over the draft stages, member j of every group on stage j."""
    return profile.strategy.name == "easyspec" and len(profile.placement.draft) > 1


def _layer_group(profile: Profile) -> int | None:
    """The draft actor drafts with EasySpec's layer groups when the profile's strategy is easyspec."""
    return profile.strategy.draft_group if profile.strategy.name == "easyspec" else None


def _resolve(stage: Stage) -> Stage:
    """`auto` becomes a GPU when the cluster has one, else the CPU."""
    if stage.device != "auto":
        return stage
    return stage.model_copy(update={"device": "cuda:0" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"})
