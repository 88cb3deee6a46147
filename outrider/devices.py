"""What hardware this machine has, what a profile needs, and whether it fits: `outrider devices` and
`outrider profile check`.

Memory is estimated before anything is loaded: the model's shape comes from its config (GGUF metadata or
config.json; no tensor is read), times the bytes per weight of the served format, plus the KV cache the scheduler
limits preallocate. Activations and the Python/torch runtime come on top, so a stage that fits with little
margin may still not run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outrider.hub import resolve
from outrider.kernels.linear import INT4_GROUP
from outrider.profile import ModelSpec, Profile, ProfileError, Stage, load_profile, resolve_device
from outrider.runtime.config import ModelConfig
from outrider.runtime.gguf_file import gguf_model_config, open_gguf
from outrider.runtime.warm import read_config

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# --- hardware ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cpu" or "cuda:N", as a profile's stage.device names it
    kind: str  # "cpu" | "cuda"
    description: str  # CPU model or GPU product name
    total_bytes: int
    free_bytes: int  # usable now: RAM available without swapping, or GPU memory not in use
    cores: int | None = None  # logical CPUs this process may run on; None for GPUs
    physical_cores: int | None = None


def discover() -> list[DeviceInfo]:
    """The CPU, then every NVIDIA GPU (none when NVML is unavailable; `nvidia_gpus` says why)."""
    return [cpu_info(), *nvidia_gpus()[0]]


def cpu_info() -> DeviceInfo:
    import psutil

    mem = psutil.virtual_memory()
    total, free = mem.total, mem.available
    limit = _cgroup_memory()
    if limit is not None:  # in a container psutil reports the host's RAM; the cgroup limit is what we may use
        total, free = min(total, limit[0]), min(free, max(limit[0] - limit[1], 0))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else psutil.cpu_count()
    return DeviceInfo("cpu", "cpu", _cpu_model(), total, free, usable, psutil.cpu_count(logical=False))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cgroup_memory() -> tuple[int, int] | None:
    """(limit, used) bytes of this process's memory cgroup (v2, then v1), when it sets a limit."""
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, used = Path(limit_file).read_text().strip(), int(Path(used_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v2 says "max", v1 a huge number, when unlimited
            return int(limit), used
    return None


def nvidia_gpus() -> tuple[list[DeviceInfo], str | None]:
    """GPUs from NVML, numbered as torch numbers them (CUDA_VISIBLE_DEVICES applied); and why none, if none."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError or NVMLError (no library, no driver): no usable GPU, not a failure
        return [], f"no NVIDIA GPU (pynvml: {exc})"
    try:
        gpus = [_gpu(pynvml, n, index) for n, index in enumerate(_visible(pynvml.nvmlDeviceGetCount()))]
    except pynvml.NVMLError as exc:
        return [], f"NVIDIA GPU present but unreadable (pynvml: {exc})"
    finally:
        pynvml.nvmlShutdown()
    return gpus, None if gpus else "no NVIDIA GPU (NVML lists none, or CUDA_VISIBLE_DEVICES hides them all)"


def local_devices() -> list[DeviceInfo]:
    """The devices a model loaded in this process can use: the CPU, and the NVIDIA GPUs only when this torch
    build can reach them (a CPU-only wheel on a GPU machine would fail at the first tensor moved to cuda:0)."""
    import torch

    gpus = nvidia_gpus()[0] if torch.cuda.is_available() else []
    return [cpu_info(), *gpus]


def _visible(count: int) -> list[int]:
    """NVML indices that torch calls cuda:0, cuda:1, ...: CUDA_VISIBLE_DEVICES order, cut at its first bad entry
    (CUDA's rule). UUID or MIG entries cannot be mapped to indices cheaply, so they fall back to all GPUs."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    out = []
    for part in (p.strip() for p in env.split(",")):
        if part.startswith(("GPU-", "MIG-")) and not out:
            return list(range(count))
        if not part.isdigit() or int(part) >= count:
            break  # CUDA's rule: the list ends at its first invalid entry ("" or "-1" hide every GPU)
        out.append(int(part))
    return out


def _gpu(pynvml: Any, n: int, index: int) -> DeviceInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return DeviceInfo(f"cuda:{n}", "cuda", name.decode() if isinstance(name, bytes) else name, mem.total, mem.free)


# --- what a profile needs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageNeed:
    role: str  # "target" | "draft"
    index: int  # position in placement.<role>
    stage: Stage
    spec: ModelSpec
    layers: tuple[int, int] | None  # [start, end) it hosts; None when the model could not be read
    weight_bytes: int = 0
    kv_bytes: int = 0
    error: str | None = None  # why the need is unknown or wrong (model not downloaded, layers past the end)

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def where(self) -> str:
        return f"placement.{self.role}[{self.index}]"


def memory_needed(profile: Profile) -> dict[str, list[StageNeed]]:
    """Per role, per stage: weights in the served format + the KV cache that the scheduler limits preallocate."""
    out: dict[str, list[StageNeed]] = {}
    for role, spec, stages in profile.roles():
        config, error = model_config(spec.model)
        out[role] = [_stage_need(role, i, stage, spec, config, error, profile, last=i == len(stages) - 1)
                     for i, stage in enumerate(stages)]
    return out


def model_config(model: str) -> tuple[Any, str | None]:
    """(ModelConfig, None), or (None, why) when the model is absent or unreadable. Reads metadata only."""
    try:
        path = resolve(model)
        if path.is_dir():
            return ModelConfig.from_hf(json.loads((path / "config.json").read_text(encoding="utf-8"))), None
        # The config recorded beside a loaded GGUF spares parsing its metadata (measured: 2 s per Qwen GGUF).
        return read_config(path) or gguf_model_config(open_gguf(path)), None
    except (RuntimeError, ValueError, OSError, KeyError) as exc:  # KeyError: config.json lacks a field
        return None, f"cannot size model {model!r}: {exc}"


def _stage_need(role: str, index: int, stage: Stage, spec: ModelSpec, config: Any, error: str | None,
                profile: Profile, last: bool) -> StageNeed:
    if config is None:
        return StageNeed(role, index, stage, spec, None, error=error)
    n = config.num_layers
    start, end = stage.layers or (0, n)
    where = f"placement.{role}[{index}].layers"
    if end > n or (last and end < n) or (index == 0 and start != 0):
        fix = ("start the first stage at 0" if index == 0 and start != 0 else
               f"end the last stage at {n}" if last else f"keep every range within 0..{n}")
        return StageNeed(role, index, stage, spec, (start, end),
                         error=f"{where}: [{start}, {end}] does not fit {spec.model}, which has {n} layers; {fix}")
    dt = DTYPE_BYTES[spec.dtype]
    limits = profile.scheduler
    # K and V, per layer: [max_running slots, kv_heads, max_seq_len, head_dim] (runtime/kv_cache.py).
    kv = 2 * (end - start) * config.num_kv_heads * config.head_dim * dt * limits.max_seq_len * limits.max_running
    weights = weight_bytes(config, spec.weights, spec.dtype, range(start, end))
    return StageNeed(role, index, stage, spec, (start, end), weights, kv)


def weight_bytes(config: Any, fmt: str, dtype: str, layers: range) -> int:
    """Bytes of the weights a stage hosting `layers` holds, as runtime/loading.py build_weights lays them out:
    the embedding (first stage) in the activation dtype, every linear in `fmt`, the norm + LM head (last stage).
    A tied LM head counts as its own copy, as build_weights quantizes it separately (shared only dense fp32)."""
    dt = DTYPE_BYTES[dtype]
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    linears = [(q + 2 * kv, c.hidden_size), (c.hidden_size, q),  # fused qkv, o
               (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]  # gate_up, down
    per_layer = sum(_linear_bytes(o, i, fmt, dt) for o, i in linears) + 2 * c.hidden_size * dt  # + 2 RMSNorms
    per_layer += (q + 2 * kv) * dt if c.qkv_bias else 0
    total = len(layers) * per_layer
    if layers.start == 0:
        total += c.vocab_size * c.hidden_size * dt
    if layers.stop == c.num_layers:
        total += c.hidden_size * dt + _linear_bytes(c.vocab_size, c.hidden_size, fmt, dt)
    return total


def _linear_bytes(out: int, inp: int, fmt: str, dt: int) -> int:
    """One [out, in] linear in the served format (kernels/linear.py)."""

    if fmt == "dense":
        return out * inp * dt
    if fmt == "int8":
        return out * inp + out * dt  # int8 codes + one scale per output row
    if fmt == "q4_0":
        return out * inp // 32 * 18  # an fp16 scale and 16 bytes of codes per 32 weights
    return out * inp // 2 + (inp // INT4_GROUP) * out * 2 * dt  # two codes a byte + (scale, zero) per group


# --- does it fit --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FitLine:
    role: str
    index: int
    device: str  # the stage's device, `auto` resolved
    needed: int | None  # weights + KV bytes; None when unknown
    free: int | None  # the device's free bytes; None when the device does not exist
    ok: bool
    message: str


def fits(profile: Profile, devices: list[DeviceInfo]) -> list[FitLine]:
    """One line per stage. Stages placed on the same device share its free memory, so each is judged by the
    sum of all of them there."""
    by_name = {d.name: d for d in devices}
    needs = [n for stages in memory_needed(profile).values() for n in stages]
    placed = [resolve_device(n.stage.device) for n in needs]
    demand: Counter[str] = Counter()
    sharers: Counter[str] = Counter()
    for need, dev in zip(needs, placed):
        if need.error is None:
            demand[dev] += need.bytes
            sharers[dev] += 1
    # The profile as a whole needs GPUs up to its highest cuda index (gpu4.yaml: cuda:0..3 -> 4 GPUs).
    want = 1 + max((int(d.split(":")[1]) for d in placed if d.startswith("cuda:")), default=-1)
    return [_fit_line(need, dev, by_name, demand[dev], sharers[dev], want) for need, dev in zip(needs, placed)]


def fit_problems(profile: Profile, devices: list[DeviceInfo]) -> list[str]:
    """`placement.<role>[i]...: problem; fix` for every stage that cannot run on `devices` (empty: it fits)."""
    out = []
    for f in fits(profile, devices):
        if f.ok:
            continue
        memory = f.needed is not None and f.free is not None  # else the message is about the device or layers
        out.append(f"placement.{f.role}[{f.index}]: not enough memory on {f.device}: {f.message}" if memory
                   else f.message)
    return out


def _fit_line(need: StageNeed, dev: str, by_name: dict[str, DeviceInfo], demand: int, sharers: int,
              want_gpus: int) -> FitLine:
    device = by_name.get(dev)
    needed = None if need.error else need.bytes
    if device is None:
        gpus = sum(d.kind == "cuda" for d in by_name.values())
        return FitLine(need.role, need.index, dev, needed, None, False,
                       f"{need.where}.device is {dev}, but this machine has {_count(gpus, 'GPU')}; use device: "
                       f"cpu or a machine with {_count(want_gpus, 'GPU')}")
    if need.error:
        return FitLine(need.role, need.index, dev, None, device.free_bytes, False, need.error)
    ok = demand <= device.free_bytes
    text = f"weights {fmt_bytes(need.weight_bytes)} + KV {fmt_bytes(need.kv_bytes)}; {dev} has " \
           f"{fmt_bytes(device.free_bytes)} free"
    if sharers > 1:
        text += f", {sharers} stages there need {fmt_bytes(demand)} together"
    if not ok:
        text += "; " + _shrink_hint(need, device)
    return FitLine(need.role, need.index, dev, need.bytes, device.free_bytes, ok, text)


def _shrink_hint(need: StageNeed, device: DeviceInfo) -> str:
    hints = ["lower scheduler.max_running or max_seq_len (KV)"]
    if device.kind == "cpu" and need.spec.weights != "int4":
        hints.append(f"set models.{need.role}.weights: int4")
    hints.append(f"or split {need.role} across devices with `layers:`")
    return "fix: " + ", ".join(hints)


def _count(n: int, noun: str) -> str:
    return f"{n or 'no'} {noun}{'' if n == 1 else 's'}"


def fmt_bytes(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


# --- command line ---------------------------------------------------------------------------------------------------

def register_cli(subparsers: Any) -> None:
    """Add `profile check` and `devices` to the `outrider` sub-command parsers."""
    p = subparsers.add_parser("profile", help="work with deployment profiles (YAML)")
    actions = p.add_subparsers(dest="profile_action", required=True)
    c = actions.add_parser("check", help="validate a profile; exit 0 when valid (and fits, with --fit), else 2")
    c.add_argument("file", help="profile YAML, e.g. deploy/profiles/cpu.yaml")
    c.add_argument("--fit", action="store_true", help="also estimate weights + KV memory against this machine")
    c.set_defaults(func=cmd_profile_check)
    d = subparsers.add_parser("devices", help="list CPU and GPUs; with --profile, whether that profile fits")
    d.add_argument("--profile", metavar="FILE", help="profile YAML to check against this machine (exit 2: no)")
    d.set_defaults(func=cmd_devices)


def cmd_profile_check(a: argparse.Namespace) -> int:
    try:
        profile = load_profile(a.file)
    except ProfileError as e:
        for problem in e.problems:
            print(f"{e.path}: {problem}", file=sys.stderr)
        return 2
    print(f"{a.file}: ok")
    for line in summary(profile):
        print(f"  {line}")
    if not a.fit:
        return 0
    gpus, why = nvidia_gpus()
    return _print_fit(profile, [cpu_info(), *gpus], why)


def cmd_devices(a: argparse.Namespace) -> int:
    gpus, why = nvidia_gpus()
    devices = [cpu_info(), *gpus]
    for d in devices:
        print(describe(d))
    if why:
        print(f"cuda     {why}")
    if a.profile is None:
        return 0
    return _print_fit(load_profile(a.profile), devices, why)


def describe(d: DeviceInfo) -> str:
    if d.kind == "cpu":
        return (f"{d.name:8} {d.description}; {d.cores} usable cores ({d.physical_cores} physical); RAM "
                f"{fmt_bytes(d.total_bytes)} total, {fmt_bytes(d.free_bytes)} available")
    return f"{d.name:8} {d.description}; {fmt_bytes(d.total_bytes)} total, {fmt_bytes(d.free_bytes)} free"


def _print_fit(profile: Profile, devices: list[DeviceInfo], why: str | None) -> int:
    lines = fits(profile, devices)
    print(f"memory for profile {profile.name!r} (weights + KV cache; activations and runtime come on top):")
    for f in lines:
        need = fmt_bytes(f.needed) if f.needed is not None else "?"
        where = f"{f.role}[{f.index}] on {f.device}"
        print(f"  {where:18} {need:>10}  {'ok' if f.ok else 'NO':2}  {f.message}")
    ok = all(f.ok for f in lines)
    if not ok and why and any(f.free is None for f in lines):
        print(f"  ({why})")
    print("fits" if ok else "does not fit")
    return 0 if ok else 2


def summary(p: Profile) -> list[str]:
    """A few lines saying what the profile runs where, for `profile check`."""
    s, v = p.scheduler, p.server
    key = "no API key" if v.api_key_env is None else (
        f"API key from ${v.api_key_env} ({'set' if os.environ.get(v.api_key_env) else 'not set in this shell'})")
    return [
        f"name       {p.name}",
        "models     " + "; ".join(f"{r} {m.model} ({m.weights}, {m.dtype})" for r, m, _ in p.roles()),
        f"placement  mode {p.placement.mode}, transport {p.placement.transport}; "
        + "; ".join(f"{r}: " + ", ".join(_stage_text(x) for x in st) for r, _, st in p.roles()),
        f"strategy   {p.strategy.name}, k {p.strategy.k}, {p.strategy.policy}",
        f"limits     max_running {s.max_running}, max_queued {s.max_queued}, max_tokens {s.max_tokens}, "
        f"max_seq_len {s.max_seq_len}, speculation gate {'on' if s.speculation_gate else 'off'}",
        f"server     http://{v.host}:{v.port}, {key}",
    ]


def _stage_text(s: Stage) -> str:
    layers = f" layers {s.layers[0]}-{s.layers[1]}" if s.layers else ""
    threads = f", {_count(s.threads, 'thread')}" if s.threads else ""
    return f"{s.device}{layers} ({s.num_cpus:g} cpu{threads})"
