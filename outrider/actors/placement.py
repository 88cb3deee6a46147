"""Ray actors placed all-or-nothing: one placement-group bundle per actor, carrying its CPUs, one GPU for a `cuda`
device, its custom resources and node labels, so Ray refuses (and says why) what the cluster cannot hold instead
of starting half of it. Inside an actor that holds one GPU, Ray sets CUDA_VISIBLE_DEVICES, so the actor's device
is always `cuda:0`: `cuda:N` in a profile chooses "a GPU" for Ray placement and the exact device only in local
mode. What each actor hosts is the caller's business (`outrider.build` plans them from a profile).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from outrider.actors.worker import FAULT_ENV

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120  # bound on placing and loading: a cluster that cannot hold the profile fails, not hangs


@dataclass(frozen=True)
class ActorPlan:
    """One actor: the class it runs, its constructor's arguments, and what it reserves."""

    cls: type
    args: tuple
    num_cpus: float
    gpu: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus, **self.resources, "GPU": 1 if self.gpu else 0}
        return {k: v for k, v in bundle.items() if v}


@dataclass
class Placed:
    """Actors placed together; removing their placement group frees every bundle."""

    group: object
    actors: list = field(default_factory=list)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.group)


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` ($RAY_ADDRESS when None), or start a local one; idempotent.

    Without an address Ray's own default joins the cluster named in its session file (/tmp/ray/ray_current_cluster)
    if there is one, and a head killed without `ray stop` leaves that file behind: ray.init then retries the dead
    GCS for minutes. "local" always starts this process's own cluster, as documented for no RAY_ADDRESS."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    _check_reachable(address)
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
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


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


def check_feasible(name: str, bundles: list[dict[str, float]]) -> None:
    """Fail at once, naming the resource, when the whole cluster has less than `bundles` ask for (Ray would
    otherwise leave the placement group pending until the timeout)."""
    have = ray.cluster_resources()
    for resource in {r for b in bundles for r in b}:
        need = sum(b.get(resource, 0) for b in bundles)
        if need > have.get(resource, 0):
            fix = ("place the stages on cpu, or run on a cluster with GPUs" if resource == "GPU"
                   else "lower placement.target[*].num_cpus / placement.draft[*].num_cpus" if resource == "CPU"
                   else f"start a node with `ray start --resources '{{\"{resource}\": {need:g}}}'`")
            raise RuntimeError(f"profile {name!r} needs {need:g} {resource} but the Ray cluster has "
                               f"{have.get(resource, 0):g}; {fix}")


def place(name: str, plans: list[ActorPlan], max_restarts: int) -> Placed:
    """Start one actor per plan in one placement group, all or none; the actors load in the background (wait on
    their first call)."""
    check_feasible(name, [p.bundle for p in plans])
    group = placement_group([p.bundle for p in plans], strategy="PACK",
                            bundle_label_selector=[dict(p.node_labels) for p in plans])
    if not group.wait(timeout_seconds=START_TIMEOUT_S):
        remove_placement_group(group)
        raise RuntimeError(f"the Ray cluster cannot hold profile {name!r}: bundles {[p.bundle for p in plans]} were "
                           f"not placed within {START_TIMEOUT_S}s; check `ray status` and the profile's "
                           "num_cpus/resources/devices")
    return Placed(group, [_start(p, group, i, max_restarts) for i, p in enumerate(plans)])


def _start(plan: ActorPlan, group, index: int, max_restarts: int):
    # max_task_retries stays 0 (at most once): a retried round could emit tokens twice; Remote callers recover.
    options = dict(num_cpus=plan.num_cpus, num_gpus=1 if plan.gpu else 0, resources=dict(plan.resources) or None,
                   max_concurrency=1, max_restarts=max_restarts, max_task_retries=0,
                   scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index))
    if os.environ.get(FAULT_ENV) == "1":  # tests: the actors may be armed with faults too
        options["runtime_env"] = {"env_vars": {FAULT_ENV: "1"}}
    return ray.remote(plan.cls).options(**options).remote(*plan.args)


def load_failure(name: str, error: BaseException) -> BaseException:
    """What to raise when waiting on a placed actor failed: the actor's own message when its constructor (the
    model load) raised, else the error itself."""
    if isinstance(error, ray.exceptions.ActorDiedError):
        lines = [line for line in getattr(error, "error_msg", str(error)).strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else type(error).__name__
        return RuntimeError(f"profile {name!r}: an actor failed to load its model: {last}")
    return error
