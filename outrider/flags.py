"""CLI flags made into the same validated configuration a YAML profile gives: `profile_from_args` builds the
`Profile` (placement mode local; hybrid with the draft in Ray actors), `strategy_options` each strategy's options.

The strategy flags come from the methods' declarations (`outrider.methods`): every field a method's options add
becomes `--field-name`, every policy a method adds (`extra_policies`) `--<policy>-k`. A flag no chosen strategy
declares is an error, not silently ignored.
"""
from __future__ import annotations

import argparse
import types
from typing import Any, Literal, Union, get_args, get_origin

import torch
from pydantic import ValidationError

from outrider.hub import DEFAULT_DRAFT, DEFAULT_TARGET
from outrider.kernels.linear import WEIGHT_CHOICES
from outrider.methods import METHODS, get_method
from outrider.methods.base import StrategyOptions
from outrider.profile import Profile, explain
from outrider.scheduler.policy import MAX_DRAFT

CPU_THREADS = 2  # the target's threads in this process; one when a draft actor takes the other core
DRAFT_K = 3  # k + 1 = 4 verify rows: one attention tile, and below the int4/int8 kernels' 5-row cliff


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Models and where they run (the profile's `models` and `placement`)."""
    p.add_argument("--target", default=DEFAULT_TARGET, help="built-in name, HF folder or .gguf file")
    p.add_argument("--draft", default=DEFAULT_DRAFT, help="built-in name, HF folder or .gguf file")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--target-weights", default="auto", choices=WEIGHT_CHOICES,
                   help="served format of the target (greedy output is identical to plain decoding at it); auto: "
                        "a GGUF file's own blocks through our kernel where the native CPU kernels run, else int4 "
                        "(dense on a GPU)")
    p.add_argument("--draft-weights", default="auto", choices=WEIGHT_CHOICES,
                   help="the draft's format (it never changes the output); auto: q4_0 (every linear requantized to "
                        "Q4_0, cheaper drafting) where the kernels run, else as for the target")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--draft-vocab", default=None,
                   help="VocabTrim file from `outrider vocab-trim`: the draft drafts only these tokens (lossless)")
    p.add_argument("--draft-actor", action="store_true",
                   help="run the draft in a Ray actor on its own core (the target keeps one thread), so drafting "
                        "can overlap verification (placement mode hybrid)")
    p.add_argument("--draft-group-actors", type=int, default=0, metavar="N",
                   help="split the draft over N Ray actors joined by gloo (one thread each), for a strategy that "
                        "splits its draft (member j of every layer group on actor j; the group size is N)")
    p.add_argument("--graphs", action="store_true",
                   help="target steps at one fixed width over a static KV cache, captured as CUDA graphs with "
                        "--device cuda, and greedy chain drafts as one graph replay per round (on the CPU they "
                        "run eagerly, slower than the default path)")


def add_strategy_args(p: argparse.ArgumentParser) -> None:
    """k, the policy flags, and every method's own options (the profile's `strategy` section)."""
    p.add_argument("--draft-k", type=int, default=None,
                   help="draft tokens per round, a tree's depth (the upper bound with a policy that chooses k); "
                        f"default: the strategy's own ({DRAFT_K} for a chain)")
    p.add_argument("--adaptive", action="store_true", help="choose k per round from measured acceptance and cost")
    for policy, (what, _), owners in _extra_policies():
        p.add_argument(f"--{policy}-k", action="store_true", dest=_policy_dest(policy),
                       help=f"{' / '.join(owners)}: policy {policy}, which {what} (--draft-k is the upper bound)")
    for name, (field, owners) in _own_fields().items():
        kind = _flag_type(field.annotation)
        extra: dict[str, Any] = {"action": argparse.BooleanOptionalAction} if kind is bool else \
            {"choices": list(get_args(field.annotation))} if kind == "choice" else {"type": kind}
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                       help=f"{' / '.join(owners)}: {field.description} (default {field.default})", **extra)


def parse(argv: list[str]) -> argparse.Namespace:
    """The model and strategy flags alone, as `generate` and `bench` read them (for code that loads models the
    way the CLI does)."""
    p = argparse.ArgumentParser(prog="outrider", add_help=False)
    add_model_args(p)
    add_strategy_args(p)
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """The flag combinations refused before anything loads, each naming the flags to change."""
    if a.draft_k is not None and not 1 <= a.draft_k <= MAX_DRAFT:
        raise ValueError(f"--draft-k must be in 1..{MAX_DRAFT}, got {a.draft_k}")
    if a.draft_group_actors == 1 or a.draft_group_actors < 0:
        raise ValueError(f"--draft-group-actors must be 0 (off) or >= 2, got {a.draft_group_actors}")
    if a.draft_group_actors and a.draft_actor:
        raise ValueError("--draft-actor and --draft-group-actors both place the draft in actors; pass one of them")
    if a.max_seq_len < 16:
        raise ValueError(f"max_seq_len must be >= 16, got {a.max_seq_len}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: this torch build sees no CUDA GPU; use --device cpu")
    if a.graphs and (a.draft_actor or a.draft_group_actors):
        raise ValueError("--graphs runs both models in this process: drop --draft-actor and --draft-group-actors, "
                         "or drop --graphs")
    policies = [p for p in ("adaptive", *(x for x, _, _ in _extra_policies())) if getattr(a, _policy_dest(p))]
    if len(policies) > 1:
        raise ValueError(f"{' and '.join(_policy_flag(p) for p in policies)} are ways to choose k; pass one of them")


def profile_from_args(a: argparse.Namespace, strategy: StrategyOptions | None = None) -> Profile:
    """The profile these flags describe: one sequence at a time, the models in this process (the draft in actors
    with --draft-actor or --draft-group-actors), `strategy` as its strategy section."""
    check_args(a)
    cpu = a.device == "cpu"
    in_actors = a.draft_actor or a.draft_group_actors
    draft_stages = ([{"device": "cpu", "num_cpus": 1, "threads": 1}] if a.draft_actor else
                    [{"device": "cpu", "num_cpus": 0.5, "threads": 1}] * a.draft_group_actors if in_actors else
                    [{"device": a.device}])
    data = {
        "name": "cli",
        "models": {"target": {"model": a.target, "weights": a.target_weights, "dtype": a.dtype},
                   "draft": {"model": a.draft, "weights": a.draft_weights, "dtype": a.dtype,
                             "vocab": a.draft_vocab}},
        "placement": {"mode": "hybrid" if in_actors else "local", "graphs": a.graphs,
                      "target": [{"device": a.device, "threads": 1 if a.draft_actor and cpu else CPU_THREADS}],
                      "draft": draft_stages},
        "scheduler": {"max_running": 1, "max_seq_len": a.max_seq_len, "max_tokens": a.max_seq_len,
                      "speculation_gate": False},
    }
    if strategy is not None:
        data["strategy"] = strategy.model_dump()
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        raise ValueError("; ".join(explain(err))) from None


def strategy_options(a: argparse.Namespace, name: str, strict: bool = True) -> StrategyOptions:
    """Strategy `name`'s options from the flags. strict: a flag of another strategy is an error (generate);
    otherwise it is left to the strategies that declare it (bench)."""
    check_args(a)
    options = get_method(name).Options
    values: dict[str, Any] = {"name": name} if a.draft_k is None else {"name": name, "k": a.draft_k}
    for policy in ("adaptive", *(p for p, _, _ in _extra_policies())):
        if getattr(a, _policy_dest(policy)):
            if policy in options.policies():
                values["policy"] = policy
            elif strict:
                raise ValueError(f"{_policy_flag(policy)} is not an option of strategy {name}; it takes "
                                 f"{' or '.join(options.policies())}")
    for field, (_, owners) in _own_fields().items():
        value = getattr(a, field, None)
        if value is None:
            continue
        if field in options.own_fields():
            values[field] = value
        elif strict:
            raise ValueError(f"--{field.replace('_', '-')} is an option of {' / '.join(owners)}, not of strategy "
                             f"{name}")
    try:
        return options(**values)
    except ValidationError as err:
        raise ValueError("; ".join(_flag_problem(line) for line in explain(err))) from None


def check_flags_used(a: argparse.Namespace, names: list[str]) -> None:
    """Every strategy flag given applies to at least one of `names` (bench: a flag none of them takes is a typo)."""
    for field, (_, owners) in _own_fields().items():
        if getattr(a, field, None) is not None and not any(field in get_method(n).Options.own_fields() for n in names):
            raise ValueError(f"--{field.replace('_', '-')} is an option of {' / '.join(owners)}, none of which is "
                             f"among the strategies {', '.join(names)}")


# -- what the declarations say ------------------------------------------------------------------------------------

def _own_fields() -> dict[str, tuple[Any, list[str]]]:
    """field name -> (its pydantic field, the methods declaring it); one declaration per name."""
    found: dict[str, tuple[Any, list[str]]] = {}
    for name, method in METHODS.items():
        for field, info in method.Options.own_fields().items():
            if field in found:
                assert found[field][0].annotation == info.annotation, f"{field}: two methods, two types"
                found[field][1].append(name)
            else:
                found[field] = (info, [name])
    return found


def _extra_policies() -> list[tuple[str, tuple[str, str], list[str]]]:
    """(policy, (what it does, what it takes), the methods offering it) for every policy beyond fixed/adaptive."""
    found: dict[str, tuple[tuple[str, str], list[str]]] = {}
    for name, method in METHODS.items():
        for policy, text in method.Options.extra_policies.items():
            found.setdefault(policy, (text, []))[1].append(name)
    return [(p, text, owners) for p, (text, owners) in found.items()]


def _policy_dest(policy: str) -> str:
    return policy if policy == "adaptive" else f"{policy}_k"


def _policy_flag(policy: str) -> str:
    return f"--{policy}" if policy == "adaptive" else f"--{policy}-k"


def _flag_type(annotation: Any) -> Any:
    """The argparse type of a field: int, float, str (also for `str | None`), bool, or "choice" for a Literal."""
    if get_origin(annotation) is Literal:
        return "choice"
    if get_origin(annotation) in (Union, types.UnionType):
        return _flag_type(next(a for a in get_args(annotation) if a is not type(None)))
    assert annotation in (int, float, str, bool), annotation
    return annotation


def _flag_problem(line: str) -> str:
    """An options error in flag terms: `k: ...` -> `--draft-k: ...`, `draft_group: ...` -> `--draft-group: ...`."""
    field, _, rest = line.partition(": ")
    return f"{'--draft-k' if field == 'k' else '--' + field.replace('_', '-')}: {rest}" if rest else line
