"""`outrider bench kernels`: what scoring M rows costs against one row, per weight format, on the real shapes of
the default target's linears. Verification of k + 1 rows is lossless only if it is batch-invariant, and it is
cheap only if the kernel's cost stays flat in M: this is the table that says which formats are.

Each kernel is timed on random weights of the shape (the cost does not depend on the values), `--kernel-layers`
layers of them one after another in 2 MiB pages as the loader lays out a model: one layer of the 1.5B target (29 MB
at gguf) would mostly stay in a 32 MB L3 between calls and flatter M = 1, whereas a decoding model streams every
layer from memory. Reported: the median over `--iters` passes of the time per layer at each M, the ratio to M = 1,
and the weight bytes streamed per second at M = 1. The row counts are timed round-robin, one pass each per
iteration, so the machine's drift (large on this shared VM) does not land on one M.

At `gguf` every kernel path the process has is timed in the same run, one row each: `gguf-vnni` (AVX512-VNNI dots)
and `gguf-amx` (AMX-INT8 tiles) on a CPU with AMX, each forced at every M; served calls take the AMX path from
the row count printed under the table.

Where our C++ kernels run, each iteration also times a plain read of the same tensors (`read_bytes`: every byte
once, rows split over the threads as the GGUF kernel splits its groups): the bound a kernel that streams its
weights is held to, taken in the same seconds as the kernel, since this VM's memory speed drifts by 1.5x.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from outrider.bench.timing import interleaved_times_ms
from outrider.kernels.linear import WEIGHT_FORMATS, make_linear
from outrider.kernels.native import available as native_available

# Qwen2.5-Coder-1.5B: fused qkv, o, fused gate_up, down (out, in)
SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)}


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--formats", default=",".join(WEIGHT_FORMATS), help="weight formats to time")
    p.add_argument("--kernel-rows", default="1,2,4,8,16,32,64,512", help="row counts M to time")
    p.add_argument("--kernel-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--kernel-layers", type=int, default=4,
                   help="distinct layers of weights timed back to back (enough to exceed the last-level cache)")


def run_kernel_bench(args: argparse.Namespace) -> int:
    from outrider.runtime.loading import parse_dtype

    dtype = parse_dtype(args.kernel_dtype)
    rows = [int(r) for r in args.kernel_rows.split(",")]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    torch.set_num_threads(2)
    results = [r for fmt in formats for r in _time_format(fmt, dtype, rows, args.iters, args.kernel_layers)]
    print(f"{'format':9} " + " ".join(f"{'M=' + str(m):>13}" for m in rows) + f" {'GB/s at M=1':>12}"
          f" {'read GB/s':>10} {'M=1 / read':>11}")
    for r in results:
        cells = " ".join(f"{r['ms'][i]:7.2f} ({r['ratio'][i]:.2f}x)" for i in range(len(rows)))
        read = (f" {r['read_gbps']:>10.1f} {r['gbps_m1'] / r['read_gbps']:>10.0%}" if r["read_gbps"] else "")
        print(f"{r['format']:9} {cells} {r['gbps_m1']:>12.1f}{read}")
    print(f"ms per decoder layer of the 1.5B target (qkv + o + gate_up + down), median over passes of "
          f"{args.kernel_layers} layers; (ratio to M = 1)")
    if "gguf" in formats and native_available():
        from outrider.kernels.gguf import amx_rows, paths

        least, most = amx_rows()
        served = (f"AMX at M = {least}..{most}" if "amx" in paths() and least > 0 else
                  "AMX off" if "amx" in paths() else "no AMX path in this process")
        print(f"gguf paths timed: {', '.join(paths())}; served calls: {served}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json_out}")
    return 0


def _time_format(fmt: str, dtype: torch.dtype, rows: list[int], iters: int, layers: int) -> list[dict]:
    """One result per kernel path of the format (gguf: each path the process has), all timed in one run."""
    g = torch.Generator().manual_seed(0)
    stack = [[_in_huge_pages(fmt, _kernel(fmt, shape, dtype, g)) for shape in SHAPES.values()] for _ in range(layers)]
    inputs = [shape[1] for shape in SHAPES.values()]
    paths = _paths(fmt)

    def one_pass(xs: list[torch.Tensor], path: str | None):
        def run():
            with _on_path(path):
                return [k(x) for layer in stack for k, x in zip(layer, xs)]
        return run

    xs = [[torch.randn(m, n, generator=g).to(dtype) for n in inputs] for m in rows]
    passes = [one_pass(x, path) for path in paths for x in xs]
    if native_available():
        tensors = [list(k.state().values()) for layer in stack for k in layer]
        passes.append(lambda: [torch.ops.outrider.read_bytes(t) for t in tensors])
    times = [statistics.median(t) / layers for t in interleaved_times_ms(passes, iters)]
    read_ms = times[-1] if native_available() else None
    nbytes = sum(k.nbytes for k in stack[0])
    results = []
    for i, path in enumerate(paths):
        ms = times[i * len(rows):(i + 1) * len(rows)]
        results.append({"format": fmt if path is None else f"{fmt}-{path}", "dtype": str(dtype).removeprefix("torch."),
                        "rows": rows, "layers": layers, "ms": ms, "ratio": [t / ms[0] for t in ms], "bytes": nbytes,
                        "gbps_m1": nbytes / ms[0] / 1e6, "read_ms": read_ms,
                        "read_gbps": nbytes / read_ms / 1e6 if read_ms else None})
    return results


def _paths(fmt: str) -> list[str | None]:
    if fmt != "gguf" or not native_available():
        return [None]
    from outrider.kernels.gguf import paths

    return list(paths())


def _on_path(path: str | None):
    from contextlib import nullcontext

    if path is None:
        return nullcontext()
    from outrider.kernels.gguf import forced_path

    return forced_path(path)


def _in_huge_pages(fmt: str, kernel):
    from outrider.kernels.linear import linear_from_state
    from outrider.runtime.memory import in_huge_pages

    return linear_from_state(fmt, in_huge_pages(kernel.state()))


def _kernel(fmt: str, shape: tuple[int, int], dtype: torch.dtype, g: torch.Generator):
    if fmt == "gguf":  # the Q4_K_M target's own layout: Q4_K blocks, Q6_K for the down projection
        from outrider.kernels.gguf import GGUFLinear, random_blocks

        qtype = "Q6_K" if shape == SHAPES["down"] else "Q4_K"
        return GGUFLinear.from_blocks([random_blocks(qtype, *shape, g)], None, dtype)
    return make_linear(fmt, torch.randn(*shape, generator=g) * 0.02, None, dtype, torch.device("cpu"))
