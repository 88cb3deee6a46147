"""Deployment profiles: one YAML file says which models run, where each role runs, how the scheduler is limited
and how the server listens. This pydantic schema is the edge: every field is typed and closed
(`extra="forbid"`), so a typo is an error naming the field instead of a silently ignored key.

Roles are `target` and `draft`. Each role is placed as one or more *stages*: one stage hosts the whole model;
several target stages split its layers into contiguous ranges, one actor per range (a model bigger than one
device); several draft stages are a draft group, for a strategy that splits its draft over several actors.

The `strategy` section is a union over every registered method's options (`outrider.methods`), tagged by `name`:
each method declares its own fields, and the checks that tie a strategy to the rest of the profile come from its
declaration (`Method.drafts_with_model`, `splits_draft`, `needs_target_features`, `drafts_trees`, `check`).

`load_profile` turns every problem into one line `FILE:LINE: dotted.path: problem; fix`, so a user never has to
read a pydantic traceback. Shipped profiles live in `deploy/profiles/`.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from outrider.methods import BASELINE, DEFAULT, METHODS, get_method, options_types
from outrider.methods.base import StrategyOptions

DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda:\d+)$")
PROFILES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "profiles"
DEFAULT_PROFILE = PROFILES_DIR / "cpu.yaml"
ROLES = ("target", "draft")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Closed):
    model: str = Field(description="built-in name (`outrider models list`), HF folder or .gguf file")
    weights: Literal["auto", "dense", "int8", "int4", "gguf", "q4_0"] = "auto"
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"


class DraftSpec(ModelSpec):
    vocab: str | None = Field(None, description="a VocabTrim file from `outrider vocab-trim`: the draft's head "
                                                "keeps only these tokens (lossless; the draft in this process)")


class Models(_Closed):
    target: ModelSpec
    draft: DraftSpec | None = None  # needed by strategies that draft with a model (vanilla)


class Stage(_Closed):
    """One actor: a device and, when the role is split, the layer range [start, end) it hosts."""

    device: str = Field("auto", description="cpu, cuda:N, or auto (the first GPU if any, else cpu)")
    layers: tuple[int, int] | None = None
    num_cpus: float = Field(1.0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch threads in the actor (default: its num_cpus)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources to require")
    node_labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels the actor must match")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v):
            raise ValueError(f"device {v!r} is not one of cpu, cuda:N (N = 0, 1, ...) or auto")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"layers {list(v)} must be [start, end) with 0 <= start < end")
        return v


class Placement(_Closed):
    mode: Literal["ray", "local", "hybrid"] = Field(
        "ray", description="ray: every stage in a Ray actor; local: the models in this process; hybrid: the target "
                           "in this process and each draft stage in a Ray actor (drafting beside the verify)")
    graphs: bool = Field(
        False, description="local: target steps at one fixed width over a static KV cache, captured as CUDA graphs "
                           "on a GPU, and greedy chain drafts as one replay per round (eager, and slower, on a CPU)")
    transport: Literal["ray", "gloo", "nccl"] = Field(
        "ray", description="how the target's logits reach the scheduler: ray (object store) or gloo "
                           "(torch.distributed; faster here). nccl is reserved and refused")
    target: list[Stage] = Field(default_factory=lambda: [Stage()])
    draft: list[Stage] = Field(default_factory=lambda: [Stage()])
    draft_backend: Literal["gloo", "nccl"] = Field(
        "gloo", description="a draft split over N stages: how the N draft group actors exchange each layer "
                            "group's results (torch.distributed): gloo (CPU, tested) or nccl (every draft stage on "
                            "a GPU; untested here)")
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a crashed actor (its model reloads); in-flight requests of a "
                             "crashed target end with an error, a crashed draft only pauses speculation")
    call_timeout_s: float = Field(
        300, gt=0, description="watchdog: an actor call not answered by then counts as hung; the actor is "
                               "killed and restarted (300 s, as SGLang's watchdog)")

    @field_validator("target", "draft")
    @classmethod
    def _some_stage(cls, stages: list[Stage]) -> list[Stage]:
        if not stages:
            raise ValueError("give at least one stage, e.g. `- {device: cpu}`")
        return stages

    @field_validator("target")
    @classmethod
    def _stages(cls, stages: list[Stage]) -> list[Stage]:
        """Target stages split its layers; several draft stages are a method that splits its draft (checked with
        the strategy)."""
        if len(stages) > 1:
            ranges = [s.layers for s in stages]
            if any(r is None for r in ranges):
                raise ValueError("a role split into several stages needs `layers: [start, end]` on every stage")
            for a, b in zip(ranges, ranges[1:]):
                if a[1] != b[0]:
                    raise ValueError(f"stage layers {list(a)} and {list(b)} are not contiguous: each stage must "
                                     f"start where the previous one ends (here at {a[1]})")
            if ranges[0][0] != 0:
                raise ValueError("the first stage must start at layer 0")
        return stages


def _strategy_name(data: Any) -> str:
    """The union's tag: a section without `name` is the default strategy."""
    return data.get("name", DEFAULT) if isinstance(data, dict) else getattr(data, "name", DEFAULT)


Strategy = Annotated[Union[tuple(Annotated[t, Tag(t.tag())] for t in options_types())],  # noqa: UP007
                     Discriminator(_strategy_name, custom_error_type="unknown_strategy",
                                   custom_error_message=f"unknown strategy; choose one of {', '.join(METHODS)}")]


class SchedulerLimits(_Closed):
    max_running: int = Field(16, ge=1, description="sequences decoded together (KV slots per model)")
    max_queued: int = Field(64, ge=0, description="requests waiting for a slot before new ones get 429")
    max_tokens: int = Field(1024, ge=1, description="upper bound on a request's max_tokens")
    max_seq_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence (KV capacity)")
    speculation_gate: bool = Field(True, description="switch drafting off while it measurably does not pay")


class ServerSpec(_Closed):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = Field(None, description="environment variable holding the Bearer API key")
    served_model_name: str | None = None  # default: the target's name
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    shutdown_timeout_s: float = Field(
        30, ge=0, description="on SIGTERM/Ctrl-C: stop taking requests, let in-flight ones finish for this "
                              "long, then end them; 0 ends them at once")


class Profile(_Closed):
    name: str = "default"
    models: Models
    placement: Placement = Field(default_factory=Placement)
    strategy: Strategy = Field(default_factory=lambda: METHODS[DEFAULT].Options())
    scheduler: SchedulerLimits = Field(default_factory=SchedulerLimits)
    server: ServerSpec = Field(default_factory=ServerSpec)

    def roles(self) -> list[tuple[str, ModelSpec, list[Stage]]]:
        """(role, model, stages) for every role this profile loads: the target, and the draft when given."""
        specs = {"target": self.models.target, "draft": self.models.draft}
        return [(r, specs[r], getattr(self.placement, r)) for r in ROLES if specs[r] is not None]

    # Cross-field checks: their messages start with the field to change, because pydantic gives errors raised
    # here no location (explain() prints them as they are).
    @model_validator(mode="after")
    def _strategy_fits(self) -> "Profile":
        check_strategy(self, self.strategy)
        return self

    @model_validator(mode="after")
    def _draft_backend(self) -> "Profile":
        draft = self.placement.draft
        if self.placement.draft_backend == "nccl":
            cpu = next((i for i, s in enumerate(draft) if not s.device.startswith("cuda")), None)
            if len(draft) < 2 or cpu is not None:
                where = " has one stage" if len(draft) < 2 else f"[{cpu}].device is {draft[cpu].device}"
                raise ValueError(f"placement.draft_backend: nccl joins draft group actors on GPUs, but "
                                 f"placement.draft{where}; use draft_backend: gloo, or give every draft stage "
                                 "device: cuda:N")
        return self

    @model_validator(mode="after")
    def _in_process_options(self) -> "Profile":
        if self.placement.graphs and self.placement.mode != "local":
            raise ValueError(f"placement.graphs: graph steps run both models in this process, but placement.mode "
                             f"is {self.placement.mode}; set mode: local, or graphs: false (drop --draft-actor, "
                             "--draft-group-actors or --graphs)")
        draft = self.models.draft
        if draft is not None and draft.vocab and self.placement.mode != "local":
            raise ValueError(f"models.draft.vocab: VocabTrim trims the draft's head in this process, but "
                             f"placement.mode is {self.placement.mode}; set mode: local, or remove vocab (it is not "
                             "supported with --draft-actor or --draft-group-actors yet)")
        return self

    @model_validator(mode="after")
    def _quantized_on_cpu(self) -> "Profile":
        # The int8/int4 kernels are CPU-only (kernels/linear.py make_linear): refuse now, not at model load.
        for role, spec, stages in self.roles():
            gpu = next((i for i, s in enumerate(stages) if s.device.startswith("cuda")), None)
            if spec.weights not in ("dense", "auto") and gpu is not None:
                raise ValueError(f"models.{role}.weights: {spec.weights} runs on the CPU only, but "
                                 f"placement.{role}[{gpu}].device is {stages[gpu].device}; set weights: dense, "
                                 "or device: cpu")
        return self

    @model_validator(mode="after")
    def _nccl_not_built(self) -> "Profile":
        # Logits end on the scheduler's CPU, where NCCL cannot receive; GPU-to-GPU hidden states between
        # target stages would use it, but that path has not been built or measured (no GPU was lent to it).
        if self.placement.transport == "nccl":
            raise ValueError("placement.transport: nccl is not available yet (GPU stage-to-stage transfer is "
                             "not built); use transport: gloo or ray")
        return self


def check_strategy(profile: Profile, options: StrategyOptions) -> None:
    """Whether `options` can run with the rest of `profile`: the checks every method's declaration implies, then
    the method's own. ValueError `field: problem; fix` (a profile validator's message has no location of its own,
    so each names its field first)."""
    method, name = get_method(options.name), options.name
    if method.drafts_with_model(options) and profile.models.draft is None:
        without = [n for n, m in METHODS.items() if not m.drafts_with_model(m.Options()) and n != BASELINE]
        without = " or ".join(without + [BASELINE])  # the ones that still speculate first
        raise ValueError(f"models.draft: missing, but strategy {name!r} drafts with a model; add `draft: {{model: "
                         f"NAME}}` under models, or set strategy.name to {without}")
    draft = profile.placement.draft
    if len(draft) > 1 and method.drafts_with_model(options) and not method.splits_draft:
        splitting = " or ".join(n for n, m in METHODS.items() if m.splits_draft)
        raise ValueError(f"placement.draft: {len(draft)} stages, but only strategy {splitting} splits the draft over "
                         f"several actors (strategy.name is {name!r}); give one draft stage, or set strategy.name: "
                         f"{splitting}")
    if method.needs_target_features(options) and (profile.placement.mode != "local" or profile.placement.graphs):
        raise ValueError(f"strategy {name!r} with these options drafts from the target's hidden states each round, "
                         "which the target gives only in this process: set placement.mode: local and graphs: "
                         "false (drop --draft-actor, --draft-group-actors and --graphs), or change the strategy's "
                         "options")
    if method.drafts_trees and profile.placement.graphs:
        raise ValueError(f"placement.graphs: graph steps score chains only, and strategy {name!r} drafts trees; set "
                         "graphs: false (drop --graphs)")
    method.check(options, profile)


class ProfileError(ValueError):
    """A profile that cannot be used. `problems` holds one line per problem; str() names the file first."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        head = f"{path}: " + ("" if len(problems) == 1 else f"{len(problems)} problems\n  ")
        super().__init__(head + "\n  ".join(problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load keeps the last of two equal keys silently; a second `target:` is always a mistake here."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key]}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a YAML profile; every problem raises ProfileError naming the file, field and fix."""
    p = Path(path).expanduser()
    if not p.is_file():
        shipped = ", ".join(sorted(f.name for f in PROFILES_DIR.glob("*.yaml"))) or "none found"
        what = "is a folder, not a YAML file" if p.is_dir() else "no such file"
        raise ProfileError(p, [f"{what}; pass a profile YAML file (shipped in {PROFILES_DIR}: {shipped})"])
    data, root = _read_yaml(p)
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(p, explain(err, root)) from None


def _read_yaml(p: Path) -> tuple[Any, yaml.Node | None]:
    """The parsed document and its node tree (the tree gives line numbers to validation errors)."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(p, [f"not UTF-8 text ({exc}); save the profile as UTF-8 YAML"]) from None
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        data = None if root is None else loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ProfileError(p, [_yaml_problem(exc)]) from None
    finally:
        loader.dispose()
    if data is None:
        raise ProfileError(p, ["the file is empty; a profile needs at least `models: {target: {model: NAME}}` "
                               f"(start from {DEFAULT_PROFILE})"])
    if not isinstance(data, dict):
        raise ProfileError(p, [f"the top level is a {type(data).__name__}, expected a mapping of sections "
                               f"({', '.join(Profile.model_fields)}); see {DEFAULT_PROFILE}"])
    return data, root


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{where}invalid YAML: {problem}" + (f" ({context})" if context else "")
    if isinstance(exc, yaml.constructor.ConstructorError):
        if exc.problem and exc.problem.startswith("could not determine a constructor"):
            # a tag such as !!python/object/apply: safe loading refuses to build objects from a profile
            return text + "; remove the tag: a profile holds only plain strings, numbers, lists and mappings"
        return text  # our duplicate-key check: the message says the fix
    return text + "; check indentation (spaces, not tabs), colons after keys, quotes around values with ': ' or ' #'"


def explain(err: ValidationError, root: yaml.Node | None = None) -> list[str]:
    """One line per error: `[line N: ]dotted.path: problem; fix`. `root` (the YAML node tree) adds line numbers."""
    found = []
    for e in err.errors():
        loc = _untagged(tuple(e["loc"]))
        problem = _problem(e, tuple(e["loc"]))
        text = f"{dotted(loc)}: {problem}" if loc and not problem.startswith(f"{dotted(loc)}.") else problem
        line = _line_of(root, loc) if root is not None else None
        found.append((line or 1 << 30, f"line {line}: {text}" if line else text))
    return [text for _, text in sorted(found, key=lambda f: f[0])]  # in file order; stable for equal lines


def _untagged(loc: tuple) -> tuple:
    """The location without the strategy union's tag: ('strategy', NAME, 'k') -> ('strategy', 'k')."""
    return tuple(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "strategy" and p in METHODS))


def dotted(loc: tuple) -> str:
    """('placement', 'target', 0, 'device') -> 'placement.target[0].device'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_BOUNDS = {"greater_than_equal": ("ge", ">=", "or more"), "greater_than": ("gt", ">", "above that"),
           "less_than_equal": ("le", "<=", "or less"), "less_than": ("lt", "<", "below that")}


def _problem(e: dict, loc: tuple) -> str:
    kind, got, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    name = loc[-1] if loc else "profile"
    if kind == "extra_forbidden":
        allowed = list(_fields_at(loc[:-1]))
        close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
        fix = f"did you mean {close[0]!r}?" if close else f"allowed here: {', '.join(allowed) or 'nothing'}"
        return f"unknown field {name!r}; {fix}"
    if kind == "missing":
        field = _fields_at(loc[:-1]).get(str(name))
        desc = f" ({field.description})" if field is not None and field.description else ""
        return f"required field {name!r} is missing; add it{desc}"
    if kind in _BOUNDS:
        key, op, more = _BOUNDS[kind]
        return f"must be {op} {ctx[key]}, got {got!r}; set it to {ctx[key]} {more}"
    if kind == "literal_error":
        return f"{got!r} is not allowed; use one of {ctx['expected']}"
    if kind in ("model_type", "dict_type"):
        if got is None:
            return "the section is empty; give its fields indented below it, or delete the line for the defaults"
        return f"expected a mapping of fields (`key: value` lines), got {type(got).__name__} {got!r}"
    if kind == "value_error":
        return e["msg"].removeprefix("Value error, ")
    if kind == "unknown_strategy":
        return f"strategy.name: unknown strategy {_strategy_name(got)!r}; choose one of {', '.join(METHODS)}"
    return f"{e['msg'][0].lower()}{e['msg'][1:]}, got {got!r}"


def _fields_at(loc: tuple) -> dict[str, Any]:
    """The pydantic fields of the model found at `loc` in the Profile schema ({} if it is not a model)."""
    model: type[BaseModel] | None = Profile
    for i, part in enumerate(loc):
        if isinstance(part, int):  # a list index: the element model was taken with the list's field
            continue
        if i and loc[i - 1] == "strategy" and part in METHODS:  # the union's tag: that method's options
            model = METHODS[part].Options
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return dict(model.model_fields) if model is not None else {}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `ModelSpec | None` or `list[Stage]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _model_in(a)) is not None), None)


def _line_of(node: yaml.Node, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node on `loc` (for a missing field: the section that lacks it)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def resolve_device(stage_device: str) -> str:
    """`auto` -> cuda:0 when torch sees a GPU, else cpu; explicit devices are returned unchanged."""
    if stage_device != "auto":
        return stage_device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
