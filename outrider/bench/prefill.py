"""`outrider bench prefill`: prompt processing on the target, per GGUF kernel path, beside llama.cpp's pp.

Each prompt is real text (standard-library sources, the same the prefix-cache bench pastes) cut to exactly N
tokens. Timed per length and path: the prefill of N - 1 tokens in chunks of PREFILL_CHUNK rows (the engine's
prefill) plus the scoring of the last token, which is the time to first token of an idle server; reported as
prompt tok/s and TTFT, the median over `--iters`. The kernel paths (`vnni`, `amx` on a CPU with AMX) are forced in
turn in one process, and the first token's logits must be bitwise equal across them (the paths are exact).

With `--peers llama.cpp`, llama.cpp's `llama-bench -p N -n 0` on the same GGUF file is run with weight repacking
on and off (`--repack`), and a failure (the repacking path has crashed on this machine kind) is reported as such,
not left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import torch

MODE = "prefill"
SOURCES = ("textwrap.py", "heapq.py", "shlex.py", "fnmatch.py", "bisect.py", "queue.py", "json/decoder.py",
           "colorsys.py", "argparse.py")


def add_prefill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lengths", default="512,2048", help=f"{MODE}: prompt tokens, comma-separated")


def prompt_tokens(tokenizer, n: int) -> list[int]:
    """Exactly n tokens of standard-library source text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in SOURCES:
        ids += tokenizer.encode((stdlib / name).read_text(encoding="utf-8"))
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the bundled sources hold {len(ids)} tokens, fewer than {n}")


def time_prefill(target, tokens: list[int]) -> tuple[float, torch.Tensor]:
    """Seconds to prefill tokens[:-1] and score the last one (TTFT), and that last row's logits."""
    slot = target.acquire()
    try:
        t0 = time.perf_counter()
        reused = target.prefill(slot, tokens[:-1])
        logits = target.score([slot], [tokens[-1:]])[0][-1]
        seconds = time.perf_counter() - t0
        if reused:
            raise RuntimeError(f"the prefix cache served {reused} tokens: the timing is not a cold prefill")
        return seconds, logits
    finally:
        target.truncate(slot, 0)  # nothing left to reuse: every run is a cold prompt
        target.release(slot)


def run_prefill_bench(a: argparse.Namespace) -> int:
    from outrider.bench.peers import find_llama_cpp
    from outrider.bench.run import parse_peers
    from outrider.hub import resolve
    from outrider.kernels.gguf import forced_path, paths
    from outrider.runtime.loading import load_model, resolve_format
    from outrider.runtime.tokenizer import Tokenizer
    from outrider.scheduler.target import LocalTarget

    lengths = [int(n) for n in a.prompt_lengths.split(",")]
    torch.set_num_threads(2)
    model, ckpt = load_model(a.target, a.dtype, a.target_weights)
    tokenizer = Tokenizer.load(ckpt.path)
    target = LocalTarget(model, 1, max(lengths) + 16)
    served = resolve_format(a.target_weights, ckpt.path, ckpt.config, torch.device("cpu"))
    kernel_paths = paths() if served == "gguf" else []  # other formats do not run gguf_mm
    rows = []
    for n in lengths:
        tokens = prompt_tokens(tokenizer, n)
        firsts = {}
        for path in kernel_paths or [None]:
            with forced_path(path) if path else nullcontext():
                time_prefill(target, tokens[:64])  # warm-up
                times = []
                for _ in range(a.iters):
                    seconds, logits = time_prefill(target, tokens)
                    times.append(seconds)
            firsts[path] = logits
            ttft = statistics.median(times)
            rows.append({"system": "outrider", "path": path, "tokens": n, "ttft_s": round(ttft, 4),
                         "prompt_tok_s": round(n / ttft, 1)})
        same = all(torch.equal(v, next(iter(firsts.values()))) for v in firsts.values())
        if not same:
            raise SystemExit(f"the kernel paths disagree on the first token's logits at {n} tokens")
    bin_dir = None
    if "llama.cpp" in parse_peers(a.peers):
        bin_dir = find_llama_cpp(Path(a.llama_cpp) if a.llama_cpp else None)
        gguf = Path(resolve(a.target))
        if bin_dir is None or gguf.suffix != ".gguf":
            raise SystemExit(f"--peers llama.cpp needs llama.cpp's binaries (make peers) and a .gguf target, "
                             f"not {gguf}")
        rows += run_llama_bench(bin_dir, gguf, lengths, a.iters)
    print(f"{'system':10} {'path':14} {'tokens':>7} {'prompt tok/s':>13} {'TTFT s':>8}")
    for r in rows:
        tps = f"{r['prompt_tok_s']:13.1f}" if r.get("prompt_tok_s") else f"{'failed':>13}"
        ttft = f"{r['ttft_s']:8.2f}" if r.get("ttft_s") else f"{'':8}"
        print(f"{r['system']:10} {str(r['path']):14} {r['tokens']:>7} {tps} {ttft}" + (f"  {r['note']}" if r.get(
            "note") else ""))
    if bin_dir is None:
        print("no llama.cpp figure: add --peers llama.cpp (its binaries come from `make peers`)")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))
        print(f"wrote {a.json_out}")
    return 0


def run_llama_bench(bin_dir: Path, gguf: Path, lengths: list[int], iters: int) -> list[dict]:
    """llama-bench's pp (prompt tok/s) on 2 threads, with weight repacking on and off."""
    out = []
    for repack in (1, 0):
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", ",".join(map(str, lengths)), "-n", "0",
               "-t", "2", "-r", str(iters), "--repack", str(repack), "-o", "json"]
        path = f"repack {'on' if repack else 'off'}"
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            out += [{"system": "llama.cpp", "path": path, "tokens": n, "note": "timed out"} for n in lengths]
            continue
        if done.returncode != 0:
            why = f"llama-bench exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
            out += [{"system": "llama.cpp", "path": path, "tokens": n, "note": why} for n in lengths]
            continue
        for r in json.loads(done.stdout):
            tps = float(r["avg_ts"])
            out.append({"system": "llama.cpp", "path": path, "tokens": int(r["n_prompt"]),
                        "prompt_tok_s": round(tps, 1), "ttft_s": round(int(r["n_prompt"]) / tps, 3)})
    return out
