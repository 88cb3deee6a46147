"""Assemble tokenizer, models and engines from user options: the one place the CLI and bench build from."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from outrider.hub import DEFAULT_DRAFT, DEFAULT_TARGET
from outrider.runtime.loading import load_model
from outrider.runtime.model import Transformer
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.dovetail import DGFHead, load_head
from outrider.scheduler.engine import Engine, Request, SpecStats
from outrider.scheduler.policy import MAX_DRAFT
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.graphed import GraphDrafter, GraphTarget
from outrider.scheduler.strategies import StrategyContext, get_strategy
from outrider.scheduler.target import LocalTarget
from outrider.scheduler.vocab_trim import TrimmedVocab, trim_head

THREADS = 2  # batch-invariance rule R6: one thread count for every target call
MODEL_DRAFTED = ("vanilla", "pearl", "dovetail")  # strategies whose drafter is the draft model's plain chain


@dataclass(frozen=True)
class ModelOptions:
    target: str = DEFAULT_TARGET
    draft: str = DEFAULT_DRAFT
    dtype: str = "bfloat16"
    # Served format of the target, the one "lossless" is measured against; auto picks the fastest one measured
    # here (a GGUF file's own blocks on an AVX512-VNNI CPU; README, CPU kernels).
    target_weights: str = "auto"  # runtime/loading.py resolve_format
    draft_weights: str = "auto"  # the draft's precision never changes the output
    max_seq_len: int = 4096
    device: str = "cpu"
    k: int = 3  # k + 1 = 4 verify rows: one attention tile, and below the int4/int8 kernels' 5-row cliff
    adaptive: bool = False
    draft_vocab: str | None = None  # a VocabTrim file: the draft's head keeps only these tokens
    draft_group: int = 2  # EasySpec: draft layers per parallel group
    # The draft in a Ray actor (its own process and core; the target keeps one thread): drafting can then run
    # while the target verifies, which is what PEARL's overlapped rounds need to be faster.
    draft_actor: bool = False
    draft_head: str | None = None  # a trained Dovetail DGF head (`outrider train-dgf`): strategy dovetail's drafter
    # EasySpec's layer groups split over this many Ray actors (member j of every group on actor j, one thread
    # each, gloo between them); the group size is then this number. 0: easyspec drafts in this process.
    draft_group_actors: int = 0
    auto_k: bool = False  # pearl: k from the measured verify / draft-step time ratio (AutoK), --draft-k its bound
    # Target steps at one fixed width over a static KV cache (outrider/runtime/graphs.py), captured as CUDA graphs
    # on a GPU, and greedy drafts of a model drafter as one draft-loop replay a round. On the CPU the same steps
    # run eagerly (slower than the default path: attention reads the whole cache); that is for tests.
    graphs: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_DRAFT:
            raise ValueError(f"--draft-k must be in 1..{MAX_DRAFT}, got {self.k}")
        if self.draft_group < 1:
            raise ValueError(f"--draft-group must be >= 1 (1 = sequential drafting), got {self.draft_group}")
        if self.draft_group_actors == 1 or self.draft_group_actors < 0:
            raise ValueError(f"--draft-group-actors must be 0 (off) or >= 2, got {self.draft_group_actors}")
        if self.auto_k and self.adaptive:
            raise ValueError("--auto-k and --adaptive are two ways to choose k; pass one of them")
        if self.draft_group_actors and self.draft_vocab:
            raise ValueError("--draft-vocab is not supported with --draft-group-actors yet")
        if self.max_seq_len < 16:
            raise ValueError(f"max_seq_len must be >= 16, got {self.max_seq_len}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: this torch build sees no CUDA GPU; use --device cpu")
        if self.graphs and (self.draft_actor or self.draft_group_actors or self.draft_head):
            raise ValueError("--graphs runs both models in this process: drop --draft-actor, --draft-group-actors "
                             "and --draft-head, or drop --graphs")
        if self.draft_head and self.draft_actor:
            raise ValueError("--draft-head is not supported with --draft-actor yet: the head reads the target's "
                             "hidden states each round, which the actor seams do not carry; drop one of them")


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    seconds: float
    stats: SpecStats

    def as_json(self) -> dict:
        s = self.stats
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason, "stats": {
            "new_tokens": s.new_tokens, "seconds": round(self.seconds, 4),
            "tokens_per_s": round(s.new_tokens / self.seconds, 3) if self.seconds else 0.0,
            "prefill_seconds": round(s.prefill_seconds, 4), "rounds": s.rounds, "draft_tokens": s.draft_tokens,
            "accepted_tokens": s.accepted_tokens, "mean_acceptance_length": round(s.mean_acceptance_length, 4),
            "accepted_per_position": s.accepted_per_position, "drafted_per_position": s.drafted_per_position,
            "draft_seconds": round(s.draft_seconds, 4), "verify_seconds": round(s.verify_seconds, 4)}}


@dataclass
class Pipeline:
    """Loaded models shared by one engine per strategy."""

    options: ModelOptions
    tokenizer: Tokenizer
    target: Transformer
    draft: Transformer | None
    load_seconds: float
    engines: dict[str, Engine] = field(default_factory=dict)
    draft_kept_ids: torch.Tensor | None = None  # [n] after VocabTrim
    hosted_drafter: object | None = None  # an ActorDrafter with --draft-actor
    group_drafter: object | None = None  # easyspec's ActorGroupDrafter with --draft-group-actors N
    draft_head: DGFHead | None = None  # with --draft-head

    @classmethod
    def load(cls, options: ModelOptions, need_draft: bool = True) -> "Pipeline":
        torch.set_num_threads(1 if options.draft_actor and need_draft else THREADS)
        t0 = time.perf_counter()
        target, ckpt = load_model(options.target, options.dtype, options.target_weights, options.device,
                                  options.max_seq_len)
        draft = hosted = None
        if need_draft and options.draft_actor:
            hosted = _draft_actor(options, target.config.vocab_size)
        elif need_draft:
            draft, _ = load_model(options.draft, options.dtype, options.draft_weights, options.device,
                                  options.max_seq_len, batch_invariant=False)
            check_vocabularies(target.config.vocab_size, draft.config.vocab_size, options.target, options.draft)
        group = _draft_group_actors(options, target.config.vocab_size) if need_draft and \
            options.draft_group_actors else None
        kept = None
        if draft is not None and options.draft_vocab:
            vocab = TrimmedVocab.load(options.draft_vocab)
            trim_head(draft, vocab)
            kept = vocab.ids
        head = load_head(options.draft_head, target) if options.draft_head else None
        return cls(options, Tokenizer.load(ckpt.tokenizer_source), target, draft, time.perf_counter() - t0,
                   draft_kept_ids=kept, hosted_drafter=hosted, draft_head=head, group_drafter=group)

    def engine(self, strategy: str) -> Engine:
        if strategy not in self.engines:
            s = get_strategy(strategy)
            if s.needs_draft(self.draft_head is not None) and self.draft is None and self.hosted_drafter is None:
                raise ValueError(f"strategy {strategy!r} needs a draft model; pass --draft")
            # The group actors host easyspec's layer groups only; the other strategies draft as they would.
            hosted = self.group_drafter if strategy == "easyspec" and self.group_drafter else self.hosted_drafter
            if self.options.graphs and self.draft is not None and strategy in MODEL_DRAFTED:
                hosted = GraphDrafter(self.draft, 1, self.options.max_seq_len)  # the model drafter, as graph rounds
            ctx = StrategyContext(self.draft, self.options.k, self.options.adaptive, 1, self.options.max_seq_len,
                                  hosted_drafter=hosted, draft_kept_ids=self.draft_kept_ids,
                                  draft_group=self.options.draft_group, draft_head=self.draft_head,
                                  auto_k=self.options.auto_k)
            target = (GraphTarget(self.target, 1, self.options.max_seq_len) if self.options.graphs
                      else LocalTarget(self.target, 1, self.options.max_seq_len))
            self.engines[strategy] = Engine(target, *s.build(ctx))
        return self.engines[strategy]

    def render(self, prompt: str, chat: bool) -> str:
        """The text the model sees: a user message in the chat template, or the raw prompt."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt

    def encode(self, prompt: str, chat: bool) -> list[int]:
        return self.tokenizer.encode(self.render(prompt, chat))

    def generate(self, prompt_ids: list[int], strategy: str, max_tokens: int,
                 params: SamplingParams = SamplingParams(), ignore_eos: bool = False) -> Result:
        stop = frozenset() if ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        t0 = time.perf_counter()
        seq = self.engine(strategy).generate(Request(prompt_ids, max_tokens, params, stop))
        seconds = time.perf_counter() - t0
        return Result(self.tokenizer.decode(seq.generated), seq.generated, seq.finish_reason or "length",
                      seconds, seq.stats)

    def with_options(self, **changes) -> "Pipeline":
        """Same loaded models, other engine knobs (k, adaptive)."""
        return replace(self, options=replace(self.options, **changes), engines={})


def _draft_actor(options: ModelOptions, target_vocab: int):
    """The draft model in a Ray actor on one CPU with one thread (a local cluster unless RAY_ADDRESS is set)."""
    import ray

    from outrider.actors.placement import connect
    from outrider.actors.remote import ActorDrafter
    from outrider.actors.worker import DraftWorker, ModelSource

    if options.draft_vocab:
        raise ValueError("--draft-vocab is not supported with --draft-actor yet")
    connect()
    source = ModelSource(options.draft, options.dtype, options.draft_weights, "cpu", options.max_seq_len,
                         batch_invariant=False)
    actor = ray.remote(DraftWorker).options(num_cpus=1, max_concurrency=1).remote(source, 1, options.max_seq_len, 1)
    check_vocabularies(target_vocab, ray.get(actor.info.remote())["vocab_size"], options.target, options.draft)
    return ActorDrafter(actor, overlap_prefill=True)


def _draft_group_actors(options: ModelOptions, target_vocab: int):
    """EasySpec's draft split over `draft_group_actors` Ray actors, one thread each, joined by gloo. They reserve
    no Ray CPUs: easyspec drafts, then verifies, so they compute while the target waits, and they start beside a
    --draft-actor on a 2-core machine (whose strategies never draft at the same time as easyspec)."""
    import ray

    from outrider.actors.draft_groups import ActorGroupDrafter, DraftShard
    from outrider.actors.placement import connect
    from outrider.actors.worker import ModelSource

    connect()
    n = options.draft_group_actors
    source = ModelSource(options.draft, options.dtype, options.draft_weights, "cpu", options.max_seq_len,
                         batch_invariant=False)
    actors = [ray.remote(DraftShard).options(num_cpus=0, max_concurrency=1).remote(
        source, 1, options.max_seq_len, 1, rank, n) for rank in range(n)]
    drafter = ActorGroupDrafter(actors, overlap_prefill=False)  # waits for the models to load
    check_vocabularies(target_vocab, ray.get(actors[0].info.remote())["vocab_size"], options.target, options.draft)
    return drafter


def check_vocabularies(target_vocab: int, draft_vocab: int, target: str, draft: str) -> None:
    """A draft proposes token ids the target scores: both must use the same vocabulary."""
    if draft_vocab != target_vocab:
        raise ValueError(f"draft {draft} has a vocabulary of {draft_vocab} tokens but the target {target} has "
                         f"{target_vocab}; a draft must share the target's tokenizer")
