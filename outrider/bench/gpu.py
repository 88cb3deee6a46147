"""`outrider bench gpu`: decode, verify and draft in CUDA graphs, a CPU target with a GPU draft, and
draft/verify overlap — with random weights of the real shapes, because the real weights cannot reach a lent GPU
machine (no model hub, no package registry there). Speed does not depend on the weights' values; acceptance does,
so the speedup lines combine the times measured here with a mean acceptance length measured on the real pair on
the CPU (`--tokens-per-round`), and say so.

Sections (each prints a table and goes into --json-out):
- graphs: per shape, ms per step eager and in one CUDA graph, at width 1 and at the served width W (decode and
  every verify share W: one shape, one set of kernels), so "verify 8 ≈ decode 1"; plus whether a position's logits
  are bitwise the same alone and among W rows;
- spec: the engine's loop over `GraphTarget` + `GraphDrafter` on the GPU: plain decoding against speculative
  rounds (greedy outputs must match), with a draft equal to the target (every draft accepted: the loop's best
  case) and with the 0.5B-shaped draft (the round's cost);
- split: the 1.5B target on the CPU with the 0.5B draft on the GPU against the same draft on the CPU, and the
  GPU draft round run beside the CPU verify (an overlapped round: the next draft during this verify) against
  one after the other.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from outrider.bench.timing import call_times_ms
from outrider.kernels.linear import INT4_GROUP, DenseLinear, Int4Linear, LinearKernel
from outrider.runtime.config import ModelConfig
from outrider.runtime.model import LayerWeights, ModelWeights, Transformer

QWEN25 = {  # the real models' shapes (Qwen2.5 config.json)
    "0.5b": ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, rope_theta=1e6, max_position=32768,
                        tie_embeddings=True, qkv_bias=True),
    "1.5b": ModelConfig("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, rope_theta=1e6, max_position=32768,
                        tie_embeddings=True, qkv_bias=True),
    "7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, rope_theta=1e6, max_position=32768,
                      tie_embeddings=False, qkv_bias=True),
}


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-sections", default="graphs,spec,split",
                   help="gpu: which sections to run (graphs, spec, split: a CPU target with a GPU draft)")
    p.add_argument("--gpu-shapes", default="0.5b,1.5b,7b", help="gpu: model shapes for the graphs section")
    p.add_argument("--width", type=int, default=8, help="gpu: the served width W every target step is padded to")
    p.add_argument("--tokens-per-round", type=float, default=None,
                   help="gpu: mean acceptance length of the real pair at --draft-k, measured on the CPU; "
                        "combined with the times here for the speedup lines")
    p.add_argument("--cpu-threads", type=int, default=None, help="gpu: threads of the CPU target (default: all)")


def random_linear(fmt: str, out: int, inp: int, dtype: torch.dtype, device: str, bias: bool,
                  g: torch.Generator) -> LinearKernel:
    """A kernel of the shape with random contents, made directly in its format (quantizing 1.5B random fp32
    weights would take minutes and measure nothing)."""
    b = (torch.randn(out, generator=g) * 0.02).to(dtype).to(device) if bias else None
    if fmt == "dense":
        return DenseLinear((torch.randn(out, inp, generator=g) * 0.02).to(dtype).to(device), b)
    if fmt == "int4":
        codes = torch.randint(0, 16, (out, inp), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale = torch.full((inp // INT4_GROUP, out), 0.002)
        sz = torch.stack([scale, torch.randn(inp // INT4_GROUP, out, generator=g) * 0.001], -1).to(dtype)
        return Int4Linear(packed, sz, b, inp)
    raise ValueError(f"random weights in format {fmt!r} are not built; use dense or int4")


def random_model(config: ModelConfig, device: str, fmt: str = "dense", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, batch_invariant: bool = True) -> Transformer:
    c, g = config, torch.Generator().manual_seed(seed)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def lin(out: int, inp: int, bias: bool = False) -> LinearKernel:
        return random_linear(fmt, out, inp, dtype, device, bias, g)

    def norm() -> torch.Tensor:
        return (1 + torch.randn(c.hidden_size, generator=g) * 0.05).to(dtype).to(device)

    layers = [LayerWeights(norm(), lin(q + 2 * kv, c.hidden_size, c.qkv_bias), lin(c.hidden_size, q), norm(),
                           lin(2 * c.intermediate_size, c.hidden_size), lin(c.hidden_size, c.intermediate_size))
              for _ in range(c.num_layers)]
    embed = (torch.randn(c.vocab_size, c.hidden_size, generator=g)).to(dtype).to(device)
    head = lin(c.vocab_size, c.hidden_size)
    weights = ModelWeights(embed, layers, norm(), head)
    return Transformer(c, weights, dtype, device, max_positions=4096, batch_invariant=batch_invariant)


def token_ids(start: int, n: int, vocab: int) -> list[int]:
    """n distinct-ish ids for a synthetic prompt (the values do not matter for speed, only that they exist)."""
    return [(start + i) % vocab for i in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, iters: int, device: str, warmup: int = 3) -> float:
    """Median ms of `fn` including the wait for its GPU work (a launch alone returns before the work ends)."""
    return round(statistics.median(call_times_ms(lambda: (fn(), _sync(device)), iters, warmup)), 3)


# -- sections -----------------------------------------------------------------------------------------------


def graphs_section(shapes: list[str], width: int, iters: int, device: str, context: int = 128) -> list[dict]:
    from outrider.runtime.graphs import StaticRunner

    rows = []
    for name in shapes:
        model = random_model(QWEN25[name], device)
        prompt = token_ids(100, context, model.config.vocab_size)
        row = {"shape": name, "weight_GB": round(model.weights.nbytes_per_token / 1e9, 3), "width": width}
        for label, w, graph in (("eager_w1", 1, False), ("graph_w1", 1, True),
                                ("eager_wW", width, False), ("graph_wW", width, True)):
            graph = graph and device.startswith("cuda")  # off CUDA the "graph" rows run the same step eagerly
            runner = StaticRunner(model, w, 2048, use_graph=graph)
            for i in range(0, context, w):
                runner.run(prompt[i:i + w])
                runner.commit(i + w)
            row[label + "_ms"] = median_ms(lambda: runner.run([7]), max(3, iters // (4 if not graph else 1)),
                                           device)
            if label == "graph_wW":
                row["verify_W_ms"] = median_ms(lambda: runner.run(list(range(1, w + 1))), iters, device)
                alone = runner.run([7])[0].clone()
                beside = runner.run([7] + list(range(20, 20 + w - 1)))[0]
                row["bitwise_alone_vs_among_W"] = bool(torch.equal(alone, beside))
        row["graph_tok_s_w1"] = round(1e3 / row["graph_w1_ms"], 1)
        row["graph_tok_s_wW"] = round(1e3 / row["graph_wW_ms"], 1)
        row["verify_W_over_decode"] = round(row["verify_W_ms"] / row["graph_wW_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache() if device.startswith("cuda") else None
    return rows


def _engine_run(target, drafter, k: int, prompt: list[int], max_tokens: int) -> tuple[list[int], float, dict]:
    from outrider.scheduler.engine import Engine, Request
    from outrider.scheduler.policy import FixedK

    engine = Engine(target, drafter, (lambda: FixedK(k)) if drafter is not None else None)
    t0 = time.perf_counter()
    seq = engine.generate(Request(prompt, max_tokens))
    seconds = time.perf_counter() - t0
    return seq.generated, seconds, seq.stats.as_dict()


def spec_section(width: int, k: int, max_tokens: int, tokens_per_round: float | None, device: str) -> dict:
    from outrider.scheduler.graphed import GraphDrafter, GraphTarget

    target, draft = random_model(QWEN25["1.5b"], device), random_model(QWEN25["0.5b"], device, seed=1)
    prompt = token_ids(1000, 128, target.config.vocab_size)
    runs = {}
    for name, make_drafter in (("plain", lambda: None), ("self-draft", lambda: GraphDrafter(target, 1, 1024, width)),
                               ("0.5b-draft", lambda: GraphDrafter(draft, 1, 1024, width))):
        gt, dr = GraphTarget(target, 1, 1024, width), make_drafter()
        _engine_run(gt, dr, k, prompt, 8)  # capture and warm up
        tokens, seconds, stats = _engine_run(gt, dr, k, prompt, max_tokens)
        decode = seconds - stats["prefill_seconds"]  # the prompt's prefill is the same in every run
        runs[name] = {"tokens": tokens, "seconds": round(seconds, 4), "tok_s": round(max_tokens / seconds, 1),
                      "decode_tok_s": round(max_tokens / decode, 1),
                      "rounds": stats["rounds"], "mean_acceptance_length": stats["mean_acceptance_length"],
                      "ms_per_round": round(decode * 1e3 / max(stats["rounds"], 1), 3)}
    plain = runs["plain"]["tokens"]
    out = {"k": k, "width": width, "max_tokens": max_tokens,
           "greedy_identical": {n: r["tokens"] == plain for n, r in runs.items()},
           **{n: {key: v for key, v in r.items() if key != "tokens"} for n, r in runs.items()}}
    if tokens_per_round:
        # Combined (labelled): a round of the 0.5B-draft run costs the same whatever is accepted (the catch-up
        # rows are one fixed-width replay); the real pair commits `tokens_per_round` per round (CPU measurement).
        # Decode only, against plain decoding's decode only.
        round_ms = runs["0.5b-draft"]["ms_per_round"]
        out["combined_spec_tok_s"] = round(tokens_per_round * 1e3 / round_ms, 1)
        out["combined_speedup_over_plain"] = round(out["combined_spec_tok_s"] / runs["plain"]["decode_tok_s"], 3)
        out["tokens_per_round_cpu"] = tokens_per_round
    print(json.dumps(out), flush=True)
    return out


def split_section(width: int, k: int, iters: int, tokens_per_round: float | None, threads: int | None,
                     device: str) -> dict:
    """Target on the CPU (int4, our served CPU format), draft on the GPU (graph loop) or on the CPU."""
    from outrider.runtime.batch import ForwardBatch
    from outrider.runtime.graphs import DraftLoop, StaticRunner
    from outrider.scheduler.drafters import DraftRequest, ModelDrafter
    from outrider.scheduler.sampling import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    cpu_target = random_model(QWEN25["1.5b"], "cpu", "int4")
    cpu_draft = random_model(QWEN25["0.5b"], "cpu", "int4", seed=1, batch_invariant=False)
    gpu_draft = random_model(QWEN25["0.5b"], device, seed=1)
    context = token_ids(1000, 256, cpu_target.config.vocab_size)
    cache = cpu_target.new_cache(1, 1024)
    cpu_target.prefill(cache, 0, context)
    n = len(context)

    def score(rows: int) -> None:
        cpu_target.forward(ForwardBatch.chain([0], [context[:rows]], [n]), cache)
        cache.truncate(0, n)

    decode_ms, verify_ms = median_ms(lambda: score(1), iters, "cpu"), median_ms(lambda: score(k + 1), iters, "cpu")

    drafter = ModelDrafter(cpu_draft, 1, 1024)
    drafter.prefill(0, context[:-1])
    request = [DraftRequest(0, context, k, SamplingParams(), None)]
    cpu_draft_ms = median_ms(lambda: drafter.propose(request), iters, "cpu")

    runner = StaticRunner(gpu_draft, width, 1024)
    for i in range(0, n - 1, width):
        part = context[i:min(i + width, n - 1)]
        runner.run(part)
        runner.commit(i + len(part))
    loop = DraftLoop(runner)

    def gpu_round() -> list[int]:  # catch up on the pending token, k drafts, tokens back on the host
        runner.fill([context[-1]], None, None)
        loop.fed.fill_(1)
        return loop.round(k).tolist()

    gpu_draft_ms = median_ms(gpu_round, iters, device)
    out = {"k": k, "cpu_threads": torch.get_num_threads(), "target": "1.5b int4 on cpu",
           "cpu_decode_ms": decode_ms, "cpu_verify_k1_ms": verify_ms, "draft_on_cpu_ms": cpu_draft_ms,
           "draft_on_gpu_ms": gpu_draft_ms, "cpu_plain_tok_s": round(1e3 / decode_ms, 1)}
    if tokens_per_round:
        for where in ("cpu", "gpu"):
            round_ms = out[f"draft_on_{where}_ms"] + verify_ms
            out[f"combined_tok_s_draft_on_{where}"] = round(tokens_per_round * 1e3 / round_ms, 1)
        out["combined_gpu_draft_over_cpu_only_spec"] = round(
            out["combined_tok_s_draft_on_gpu"] / out["combined_tok_s_draft_on_cpu"], 3)
        out["combined_gpu_draft_over_cpu_plain"] = round(out["combined_tok_s_draft_on_gpu"] / out["cpu_plain_tok_s"], 3)
    out["overlap_gpu_draft_with_cpu_verify"] = _together(gpu_round, lambda: score(k + 1), iters, device)
    print(json.dumps(out), flush=True)
    return out


def _together(a, b, iters: int, device: str) -> dict:
    """a and b alone, one after the other, and started together on two threads (a's GPU work on its own
    stream): an overlapped round costs the `together` time instead of the sum."""
    a()  # first call on the default stream: graphs are captured there, not inside a side-stream context
    _sync(device)
    stream = torch.cuda.Stream() if device.startswith("cuda") else None

    def on_stream():
        if stream is None:
            return a()
        with torch.cuda.stream(stream):
            result = a()
        stream.synchronize()
        return result

    def both():
        worker = threading.Thread(target=on_stream)
        worker.start()
        b()
        _sync(device)
        worker.join()

    alone_a, alone_b = median_ms(on_stream, iters, device), median_ms(b, iters, device)
    together = median_ms(both, iters, device)
    return {"a_alone_ms": alone_a, "b_alone_ms": alone_b, "sequential_ms": round(alone_a + alone_b, 3),
            "together_ms": together, "overlap_gain": round((alone_a + alone_b) / together, 3)}


def run_gpu_bench(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("outrider bench gpu: no CUDA device here; running the same code eagerly on the CPU (no graphs)")
    sections = [s.strip() for s in args.gpu_sections.split(",") if s.strip()]
    from outrider.flags import DRAFT_K

    k = args.draft_k or DRAFT_K
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "weights": "random, real shapes", "k": k}
    if "graphs" in sections:
        report["graphs"] = graphs_section(args.gpu_shapes.split(","), args.width, args.iters, device)
    if "spec" in sections:
        report["spec"] = spec_section(args.width, k, args.max_tokens, args.tokens_per_round, device)
    if "split" in sections:
        report["split"] = split_section(args.width, k, args.iters, args.tokens_per_round, args.cpu_threads, device)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m outrider.bench.gpu`): a GPU machine may lack the server's dependencies."""
    p = argparse.ArgumentParser(prog="python -m outrider.bench.gpu", description=__doc__.split("\n")[0])
    add_gpu_args(p)
    p.add_argument("--draft-k", type=int, default=3)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json-out", default=None)
    return run_gpu_bench(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
