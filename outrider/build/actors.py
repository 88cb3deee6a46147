"""The builder's Ray side: a profile's stages planned as actors (`outrider.actors.placement`), and what the engine
sees of them — the target's stages as one `ActorTarget`, the draft as one actor per drafter kind or as a draft
group (several draft stages, for a strategy that splits its draft)."""
from __future__ import annotations

from dataclasses import dataclass, field

from outrider.actors.draft_groups import ActorGroupDrafter, DraftShard
from outrider.actors.placement import ActorPlan, Placed, check_feasible, cluster_has_gpu, connect, load_failure, place
from outrider.actors.remote import ActorDrafter, ActorTarget
from outrider.actors.worker import DraftWorker, ModelSource, ModelWorker
from outrider.profile import ModelSpec, Profile, Stage
from outrider.scheduler.drafters import Drafter, DrafterFactory, GroupDrafterFactory, check_vocabularies


def start_remote(profile: Profile, needs_draft: bool) -> tuple[ActorTarget, "ActorDraft | None", list[Placed]]:
    """Place the target's stages (they load in the background: `ActorDraft.ready` and `ActorTarget.wait` block)
    and say where the draft's actors will go. The whole profile must fit the cluster, or nothing starts."""
    connect()
    targets = [_resolve(s) for s in profile.placement.target]
    drafts = [_resolve(s) for s in profile.placement.draft] if needs_draft else []
    check_feasible(profile.name, [_plan(None, (), s).bundle for s in targets + drafts])
    limits, spec = profile.scheduler, profile.models.target
    plans = [_plan(ModelWorker, (_source(spec, s, limits.max_seq_len, True), limits.max_running, limits.max_seq_len,
                                 s.layers, _threads(s)), s) for s in targets]
    placed = [place(profile.name, plans, profile.placement.max_restarts)]
    target = ActorTarget(placed[0].actors, profile.placement.call_timeout_s)
    draft = ActorDraft(profile, drafts, placed, overlap_prefill=not _share_cpus(targets, drafts)) if drafts else None
    return target, draft, placed


def hybrid_draft(profile: Profile, target_vocab: int, placed: list[Placed]) -> "ActorDraft":
    """The draft's stages as actors beside a target in this process (placed on first use)."""
    connect()
    stages = [_resolve(s) for s in profile.placement.draft]
    check_feasible(profile.name, [_plan(None, (), s).bundle for s in stages])
    return ActorDraft(profile, stages, placed, overlap_prefill=True, target_vocab=target_vocab)


def wait_remote(profile: Profile, target: ActorTarget | None, draft: "ActorDraft | None") -> None:
    """Block until every placed model has loaded; a failed load raises one clear error."""
    try:
        if target is not None:
            target.wait(gloo=profile.placement.transport == "gloo")
        if draft is not None:
            draft.ready(target.vocab_size if target is not None else draft.target_vocab)
    except BaseException as e:
        raise load_failure(profile.name, e) from None


@dataclass
class ActorDraft:
    """The draft in Ray actors: one `DraftWorker` per drafter kind (factory) on the one draft stage, or the draft
    group's `DraftShard`s, one per stage. Each is placed on first use and checked in `ready`."""

    profile: Profile
    stages: list[Stage]
    placed: list[Placed]  # the deployment's placements: these join them
    overlap_prefill: bool
    target_vocab: int | None = None  # set where the target runs in this process
    drafters: dict[object, Drafter] = field(default_factory=dict)
    _unchecked: list[ActorDrafter] = field(default_factory=list)

    def drafter(self, factory: DrafterFactory, split: GroupDrafterFactory | None) -> Drafter:
        key = split if len(self.stages) > 1 else factory
        if key not in self.drafters:
            self.drafters[key] = self._group(split) if len(self.stages) > 1 else self._one(factory)
        return self.drafters[key]

    def ready(self, target_vocab: int) -> None:
        """Wait for the placed drafts to load and check they share the target's vocabulary."""
        while self._unchecked:
            d = self._unchecked.pop()
            check_vocabularies(target_vocab, d.info()["vocab_size"], self.profile.models.target.model,
                               self.profile.models.draft.model)

    def _one(self, factory: DrafterFactory) -> ActorDrafter:
        stage, limits = self.stages[0], self.profile.scheduler
        args = (self._source(stage), limits.max_running, limits.max_seq_len, _threads(stage), factory)
        p = self._place([_plan(DraftWorker, args, stage)])
        drafter = ActorDrafter(p.actors[0], self.overlap_prefill, self.profile.placement.call_timeout_s)
        self._unchecked.append(drafter)
        return drafter

    def _group(self, split: GroupDrafterFactory | None) -> ActorGroupDrafter:
        assert split is not None, "a strategy that cannot split its draft was checked against several draft stages"
        limits, world = self.profile.scheduler, len(self.stages)
        p = self._place([_plan(DraftShard, (self._source(s), limits.max_running, limits.max_seq_len, _threads(s),
                                            split, rank, world), s) for rank, s in enumerate(self.stages)])
        try:  # joins their torch.distributed group (waits for their models to load)
            drafter = ActorGroupDrafter(p.actors, self.overlap_prefill and self.profile.placement.mode == "ray",
                                        self.profile.placement.call_timeout_s, self.profile.placement.draft_backend)
        except BaseException as e:
            raise load_failure(self.profile.name, e) from None
        self._unchecked.append(drafter)
        return drafter

    def _place(self, plans: list[ActorPlan]) -> Placed:
        p = place(self.profile.name, plans, self.profile.placement.max_restarts)
        self.placed.append(p)
        return p

    def _source(self, stage: Stage) -> ModelSource:
        spec = self.profile.models.draft
        assert spec is not None
        return _source(spec, stage, self.profile.scheduler.max_seq_len, False)


def _source(spec: ModelSpec, stage: Stage, capacity: int, target: bool) -> ModelSource:
    device = "cuda:0" if stage.device.startswith("cuda") else "cpu"
    return ModelSource(spec.model, spec.dtype, spec.weights, device, capacity, batch_invariant=target)


def _plan(cls: type | None, args: tuple, stage: Stage) -> ActorPlan:
    return ActorPlan(cls, args, stage.num_cpus, stage.device.startswith("cuda"), dict(stage.resources),
                     dict(stage.node_labels))


def _threads(stage: Stage) -> int:
    return stage.threads or max(1, int(stage.num_cpus))


def _share_cpus(targets: list[Stage], drafts: list[Stage]) -> bool:
    """Draft and target both computing on CPUs (of one node, as PACK places them when it can)."""
    return any(s.device == "cpu" for s in drafts) and any(s.device == "cpu" for s in targets)


def _resolve(stage: Stage) -> Stage:
    """`auto` becomes a GPU when the cluster has one, else the CPU."""
    if stage.device != "auto":
        return stage
    return stage.model_copy(update={"device": "cuda:0" if cluster_has_gpu() else "cpu"})
