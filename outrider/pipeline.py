"""One request at a time over a deployment (`outrider generate`, `outrider bench`, `outrider vocab-trim`): encode,
generate with a strategy by name, decode, time. The engines come from the one builder (`outrider.build`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from outrider.build import Deployment
from outrider.flags import check_flags_used, parse, profile_from_args, strategy_options
from outrider.methods import get_method
from outrider.methods.base import StrategyOptions
from outrider.profile import Profile
from outrider.runtime.model import Transformer
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.engine import Engine, Request, SpecStats
from outrider.scheduler.grammar import Grammar, GrammarTokenizer
from outrider.scheduler.sampling import SamplingParams


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
            "drafts_per_position": s.drafts_per_position,
            "draft_seconds": round(s.draft_seconds, 4), "verify_seconds": round(s.verify_seconds, 4)}}


@dataclass
class Pipeline:
    """A deployment and one engine per strategy, built on first use."""

    deployment: Deployment
    strategies: dict[str, StrategyOptions]  # name -> the options its engine runs with
    engines: dict[str, Engine] = field(default_factory=dict)

    @classmethod
    def load(cls, profile: Profile, strategies: list[StrategyOptions] | None = None) -> "Pipeline":
        """Load what `strategies` (default: the profile's) need; `generate` takes any of them by name."""
        strategies = strategies or [profile.strategy]
        return cls(Deployment.start(profile, strategies), {o.name: o for o in strategies})

    @classmethod
    def from_flags(cls, argv: list[str], strategies: list[str]) -> "Pipeline":
        """What `outrider bench --strategies ...` loads with these model and strategy flags."""
        a = parse(argv)
        check_flags_used(a, strategies)
        options = [strategy_options(a, name, strict=False) for name in strategies]
        return cls.load(profile_from_args(a, options[0]), options)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.deployment.tokenizer

    @property
    def target(self) -> Transformer:
        assert self.deployment.target_model is not None, "the target runs in actors"
        return self.deployment.target_model

    @property
    def load_seconds(self) -> float:
        return self.deployment.load_seconds

    def engine(self, strategy: str) -> Engine:
        if strategy not in self.engines:
            options = self.strategies.get(strategy) or get_method(strategy).Options()
            self.engines[strategy] = self.deployment.engine(options)
        return self.engines[strategy]

    def encode(self, prompt: str, chat: bool) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render(prompt, chat))

    def render(self, prompt: str, chat: bool) -> str:
        return self.tokenizer.render(prompt, chat)

    def grammar(self, schema_file: str | None) -> Grammar | None:
        """The grammar of `--json-schema FILE` (`any`: any JSON object; a shipped prompt set's name: its schema;
        None: no grammar)."""
        if schema_file is None:
            return None
        import importlib.resources
        import json
        from pathlib import Path

        shipped = importlib.resources.files("outrider").joinpath("prompt_sets", f"{schema_file}.schema.json")
        if schema_file == "any":
            schema = None
        elif Path(schema_file).is_file():
            schema = json.loads(Path(schema_file).read_text())
        elif shipped.is_file():
            schema = json.loads(shipped.read_text())
        else:
            raise ValueError(f"--json-schema {schema_file}: no such file (or `any`, or a shipped set: json-extract)")
        vocab = self.engine(next(iter(self.strategies))).target.vocab_size
        tokens = GrammarTokenizer(self.tokenizer.backend.to_str(), vocab, self.tokenizer.eos_token_ids)
        return tokens.json_schema(schema)

    def generate(self, prompt_ids: list[int], strategy: str, max_tokens: int,
                 params: SamplingParams = SamplingParams(), ignore_eos: bool = False,
                 grammar: Grammar | None = None) -> Result:
        stop = frozenset() if ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        t0 = time.perf_counter()
        seq = self.engine(strategy).generate(Request(prompt_ids, max_tokens, params, stop, grammar=grammar))
        seconds = time.perf_counter() - t0
        return Result(self.tokenizer.decode(seq.generated), seq.generated, seq.finish_reason or "length",
                      seconds, seq.stats)

    def shutdown(self) -> None:
        self.deployment.shutdown()
