"""`outrider` command line: generate, bench, models, profile, devices, serve, batch, submit."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from outrider.flags import add_model_args, add_strategy_args, profile_from_args, strategy_options
from outrider.hub import BUILTINS, DEFAULT_DRAFT, DEFAULT_TARGET
from outrider.methods import BASELINE, DEFAULT, METHODS
from outrider.scheduler.sampling import SamplingParams


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="structured output: every generation is JSON valid for the schema in FILE (a JSON file; "
                        "`any` for any JSON object)")


def sampling_params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(a.temperature, a.top_k, a.top_p, a.seed)


def cmd_generate(a: argparse.Namespace) -> int:
    from outrider.pipeline import Pipeline

    if (a.prompt is None) == (a.chat is None):
        raise ValueError("give exactly one of --prompt TEXT (raw completion) or --chat TEXT (chat template)")
    options = strategy_options(a, a.strategy)
    pipe = Pipeline.load(profile_from_args(a, options))
    ids = pipe.encode(a.chat if a.chat is not None else a.prompt, chat=a.chat is not None)
    params = sampling_params(a)
    grammar = pipe.grammar(a.json_schema)
    if a.compare_plain:  # first calls pay one-time costs (thread pools, first-touch pages): warm both sides alike
        for name in {a.strategy, BASELINE}:
            pipe.generate(ids, name, 2, params, a.ignore_eos, grammar)
    result = pipe.generate(ids, a.strategy, a.max_tokens, params, a.ignore_eos, grammar)
    out = result.as_json()
    if a.compare_plain and a.strategy != BASELINE:
        plain = pipe.generate(ids, BASELINE, a.max_tokens, params, a.ignore_eos, grammar)
        out["plain"] = plain.as_json()["stats"]
        out["speedup_over_plain"] = round(plain.seconds / result.seconds * result.stats.new_tokens
                                          / max(plain.stats.new_tokens, 1), 3)
        out["identical_to_plain"] = plain.token_ids == result.token_ids
    if a.json:
        print(json.dumps(out))
    else:
        print_generation(out, pipe.load_seconds, a.strategy)
    return 0


def print_generation(out: dict, load_seconds: float, strategy: str) -> None:
    s = out["stats"]
    print(out["text"])
    print(f"\n--- {strategy}: {s['new_tokens']} tokens in {s['seconds']:.2f}s = {s['tokens_per_s']:.1f} tok/s, "
          f"mean acceptance length {s['mean_acceptance_length']:.2f}, rounds {s['rounds']} "
          f"(models loaded in {load_seconds:.1f}s)")
    if "plain" in out:
        p = out["plain"]
        print(f"--- plain decoding: {p['new_tokens']} tokens at {p['tokens_per_s']:.1f} tok/s; speedup "
              f"{out['speedup_over_plain']:.2f}x; output identical to plain: {out['identical_to_plain']}")


def cmd_vocab_trim(a: argparse.Namespace) -> int:
    """Count the tokens of the target's own greedy generations on a prompt set; keep the most frequent."""
    from collections import Counter

    from tqdm import tqdm

    from outrider.pipeline import Pipeline
    from outrider.prompts import load_prompts
    from outrider.scheduler.vocab_trim import TrimmedVocab

    pipe = Pipeline.load(profile_from_args(a, strategy_options(a, BASELINE)))
    counts: Counter = Counter()
    for p in tqdm(load_prompts(a.prompts, a.limit), desc="target generations", unit="prompt", file=sys.stderr):
        counts.update(pipe.generate(pipe.encode(p.text, p.chat), BASELINE, a.max_tokens).token_ids)
    vocab = TrimmedVocab.from_counts(counts, pipe.target.config.vocab_size, a.keep)
    vocab.save(a.out)
    print(f"{a.out}: {vocab.ids.numel()} of {vocab.vocab_size} tokens ({len(counts)} distinct seen in "
          f"{sum(counts.values())} generated tokens)")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from outrider import hub

    if a.action == "pull":
        for name in a.names or [DEFAULT_TARGET, DEFAULT_DRAFT]:
            print(hub.pull(name, force=a.force))
    else:
        for m in hub.list_models():
            flag = "present" if m["present"] else "absent "
            print(f"{m['name']:32} {m['role']:8} {flag} {m['path']}")
    return 0


# --requests and --concurrency are shared by two modes that read them differently: serving runs each level of a
# list, load one concurrency for N requests in all. So their parser defaults are None, filled in per mode here.
BENCH_MODE_DEFAULTS: dict[str, dict[str, object]] = {
    "serving": {"requests": 16, "concurrency": "1,4,16"},
    "load": {"requests": 1000, "concurrency": "16"},
}


def cmd_bench(a: argparse.Namespace) -> int:
    for name, value in BENCH_MODE_DEFAULTS.get(a.mode, {}).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    from outrider.bench.multi_draft import MODE as MULTI_DRAFT
    from outrider.bench.prefill import MODE as PREFILL
    from outrider.bench.prefix import MODE as PREFIX_CACHE

    if a.mode == PREFILL:
        from outrider.bench.prefill import run_prefill_bench

        return run_prefill_bench(a)
    if a.mode == MULTI_DRAFT:
        from outrider.bench.multi_draft import run_multi_draft_bench

        return run_multi_draft_bench(a)
    if a.mode == PREFIX_CACHE:
        from outrider.bench.prefix import run_prefix_bench

        return run_prefix_bench(a)
    if a.mode == "grammar":
        from outrider.bench.grammar import run_grammar_bench

        return run_grammar_bench(a)
    if a.mode == "gpu":
        from outrider.bench.gpu import run_gpu_bench

        return run_gpu_bench(a)
    if a.mode == "overlap":
        from outrider.bench.overlap import run_overlap_bench

        return run_overlap_bench(a)
    if a.mode == "load":
        from outrider.bench.load import run_load_bench

        return run_load_bench(a)
    if a.mode == "serving":
        from outrider.bench.serving import run_serving_bench

        return run_serving_bench(a)
    if a.mode == "transport":
        from outrider.bench.transport import run_transport_bench

        return run_transport_bench(a)
    if a.mode == "kernels":
        from outrider.bench.kernels import run_kernel_bench

        return run_kernel_bench(a)
    from outrider.bench.run import run_bench

    return run_bench(a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrider", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a decoding strategy")
    g.add_argument("--prompt", help="raw text to complete")
    g.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    g.add_argument("--strategy", default=DEFAULT, choices=list(METHODS),
                   help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()))
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--compare-plain", action="store_true", help="also run plain decoding and report the speedup")
    add_model_args(g)
    add_strategy_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="fetch and list built-in models")
    m.add_argument("action", choices=["pull", "list"])
    m.add_argument("names", nargs="*", help=f"built-ins: {', '.join(BUILTINS)}")
    m.add_argument("--force", action="store_true", help="re-assemble and re-verify even if present")
    m.set_defaults(func=cmd_models)

    v = sub.add_parser("vocab-trim", help="build a VocabTrim file: the draft head keeps the target's frequent tokens")
    v.add_argument("--prompts", default="code", help="prompt set (or file) the target generates on")
    v.add_argument("--limit", type=int, default=None)
    v.add_argument("--keep", type=int, default=32768, help="tokens kept (rounded up to a multiple of 16)")
    v.add_argument("--out", required=True, help="where to write the JSON file")
    add_model_args(v)
    add_strategy_args(v)
    v.set_defaults(func=cmd_vocab_trim, max_tokens=128)
    v.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")

    from outrider.bench.multi_draft import MODE as MULTI_DRAFT
    from outrider.bench.multi_draft import add_multi_draft_args
    from outrider.bench.prefill import MODE as PREFILL
    from outrider.bench.prefill import add_prefill_args
    from outrider.bench.prefix import MODE as PREFIX_CACHE
    from outrider.bench.prefix import add_prefix_args

    b = sub.add_parser("bench", help="measure strategies and peers on prompt sets, or serving under concurrency")
    b.add_argument("mode", nargs="?",
                   choices=["strategies", "serving", "load", "transport", "kernels", "overlap", "gpu", MULTI_DRAFT,
                            PREFIX_CACHE, "grammar", PREFILL],
                   default="strategies",
                   help="strategies: decoding methods one request at a time (default); serving: a profile under "
                        "concurrent load, actors against in-process; load: `outrider serve` under bounded HTTP "
                        "load, every stream checked token by token (--url, or --profile to start one); "
                        "transport: per-round actor overhead alone; kernels: linear-layer cost against rows scored, "
                        "per weight format; overlap: a draft block in its actor against a verify, alone and "
                        "together (whether rounds that draft during the verify can pay on this machine); gpu: "
                        "CUDA-graph decode/verify/draft, a CPU target with a GPU draft and their overlap, on random "
                        f"weights of the real shapes; {MULTI_DRAFT}: the acceptance of each verifier of several drafts "
                        "per position beside the optimal transport bound, at positions of sampled continuations; "
                        f"{PREFIX_CACHE}: time to first token of a long chat's second turn with its first turn cached "
                        "against a cold prompt, through `outrider serve` (--url, or --profile to start one); grammar: "
                        "what each installed grammar library costs per schema and per token mask on --target's "
                        f"vocabulary; {PREFILL}: prompt tok/s and time to first token of --target per kernel path, "
                        "beside llama.cpp's llama-bench pp with repacking on and off")
    from outrider.bench.gpu import add_gpu_args
    from outrider.bench.kernels import add_kernel_args
    from outrider.bench.load import add_load_args
    from outrider.bench.overlap import add_overlap_args
    from outrider.bench.run import add_bench_args
    from outrider.bench.serving import add_serving_args
    from outrider.bench.transport import add_transport_args

    add_bench_args(b)
    add_serving_args(b)
    add_transport_args(b)
    add_kernel_args(b)
    add_load_args(b)
    add_overlap_args(b)
    add_gpu_args(b)
    add_multi_draft_args(b)
    add_prefix_args(b)
    add_prefill_args(b)
    add_model_args(b)
    add_strategy_args(b)
    add_sampling_args(b)
    b.set_defaults(func=cmd_bench, max_tokens=64, requests=None, concurrency=None)  # None: BENCH_MODE_DEFAULTS

    from outrider.devices import register_cli as register_devices

    register_devices(sub)
    from outrider.server.cli import register_cli as register_serve

    register_serve(sub)
    from outrider.jobs import register_cli as register_jobs

    register_jobs(sub)
    for method in METHODS.values():  # a method's own commands (a training command)
        method.commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"outrider: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
