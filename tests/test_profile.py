"""Deployment profiles: shipped files validate, every error names file, field and fix, memory estimates add up,
device discovery and the `profile check` / `devices` commands. No Ray, no model weights loaded."""
from __future__ import annotations

import argparse
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest
from pydantic import ValidationError

from outrider import hub
from outrider.devices import (
    DeviceInfo,
    _visible,
    cpu_info,
    discover,
    fits,
    memory_needed,
    model_config,
    nvidia_gpus,
    register_cli,
    weight_bytes,
)
from outrider.profile import DEFAULT_PROFILE, PROFILES_DIR, Profile, ProfileError, explain, load_profile, resolve_device

SHIPPED = ["cpu", "local", "gpu", "dovetail", "gpu2", "gpu4", "tiny", "pearl", "easyspec"]
TINY = PROFILES_DIR / "tiny.yaml"
SMOLLM = "smollm2-135m-instruct"
MINIMAL = "models:\n  target: {model: x}\n  draft: {model: x}\n"


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(str(path)), "the error must name the file first"
    return message


# --- the shipped profiles --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_validate(name):
    profile = load_profile(PROFILES_DIR / f"{name}.yaml")
    assert profile.name == name
    for role, spec, stages in profile.roles():
        if spec.weights != "dense":  # the int4/int8 kernels are CPU-only
            assert all(s.device == "cpu" for s in stages), (name, role)


def test_every_shipped_file_is_tested():
    assert sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")) == sorted(SHIPPED)


def test_default_profile_is_the_cpu_pair():
    p = load_profile(DEFAULT_PROFILE)
    assert (p.models.target.model, p.models.target.weights) == ("qwen2.5-coder-1.5b-instruct", "auto")
    assert (p.models.draft.model, p.models.draft.weights) == ("qwen2.5-coder-0.5b-instruct", "auto")
    assert p.placement.mode == "ray" and [s.device for s in p.placement.target + p.placement.draft] == ["cpu"] * 2
    assert (p.strategy.name, p.strategy.k) == ("vanilla", 3)
    assert (p.scheduler.max_running, p.scheduler.max_queued, p.scheduler.max_tokens,
            p.scheduler.max_seq_len) == (16, 64, 1024, 2048)
    assert (p.server.host, p.server.port, p.server.api_key_env) == ("127.0.0.1", 8000, "OUTRIDER_API_KEY")
    assert load_profile(PROFILES_DIR / "local.yaml").placement.mode == "local"


def test_gpu4_splits_the_target_by_layers():
    p = load_profile(PROFILES_DIR / "gpu4.yaml")
    assert [s.layers for s in p.placement.target] == [(0, 10), (10, 19), (19, 28)]
    assert p.placement.draft[0].device == "cuda:3" and p.placement.transport == "gloo"


# --- errors: field path, problem, fix -------------------------------------------------------------------------

def test_unknown_field_suggests_the_close_name(tmp_path):
    msg = problems(write(tmp_path, MINIMAL + "placement:\n  target:\n    - {devcie: cpu}\n"))
    assert "line 6: placement.target[0].devcie: unknown field 'devcie'; did you mean 'device'?" in msg


def test_unknown_field_without_close_match_lists_the_allowed(tmp_path):
    msg = problems(write(tmp_path, MINIMAL + "scheduler: {zzz: 1}\n"))
    assert "scheduler.zzz: unknown field 'zzz'" in msg and "max_running" in msg


def test_bad_device(tmp_path):
    msg = problems(write(tmp_path, MINIMAL + "placement:\n  draft: [{device: gpu1}]\n"))
    assert "placement.draft[0].device" in msg and "'gpu1'" in msg and "cpu, cuda:N" in msg


def test_non_contiguous_stages(tmp_path):
    stages = "    - {device: cpu, layers: [0, 10]}\n    - {device: cpu, layers: [11, 30]}\n"
    text = MINIMAL + "placement:\n  target:\n" + stages
    msg = problems(write(tmp_path, text))
    assert "placement.target: stage layers [0, 10] and [11, 30] are not contiguous" in msg
    assert "start where the previous one ends (here at 10)" in msg


def test_split_without_layers(tmp_path):
    msg = problems(write(tmp_path, MINIMAL + "placement:\n  target: [{device: cpu}, {device: cpu}]\n"))
    assert "placement.target" in msg and "layers: [start, end]" in msg


def test_missing_draft_for_vanilla(tmp_path):
    msg = problems(write(tmp_path, "models:\n  target: {model: x}\nstrategy: {name: vanilla}\n"))
    assert "models.draft: missing" in msg and "strategy.name to prompt-lookup" in msg
    load_profile(write(tmp_path, "models:\n  target: {model: x}\nstrategy: {name: prompt-lookup}\n", "ok.yaml"))


def test_missing_required_field(tmp_path):
    msg = problems(write(tmp_path, "name: x\nstrategy: {name: autoregressive}\n"))
    assert "models: required field 'models' is missing; add it" in msg


def test_negative_limit(tmp_path):
    msg = problems(write(tmp_path, MINIMAL + "scheduler:\n  max_running: -1\n"))
    assert "line 5: scheduler.max_running: must be >= 1, got -1; set it to 1 or more" in msg


def test_wrong_literal_and_empty_section(tmp_path):
    msg = problems(write(tmp_path, "models:\n  target: {model: x, weights: int3}\n  draft: {model: x}\nserver:\n"))
    assert ("models.target.weights: 'int3' is not allowed; use one of 'auto', 'dense', 'int8', 'int4', 'gguf' or "
            "'q4_0'") in msg
    assert "line 4: server: the section is empty" in msg
    assert "2 problems" in msg


def test_quantized_weights_on_gpu_are_rejected(tmp_path):
    text = ("models:\n  target: {model: x}\n  draft: {model: x, weights: int4}\n"
            "placement:\n  draft: [{device: 'cuda:0'}]\n")
    msg = problems(write(tmp_path, text))
    assert "models.draft.weights: int4 runs on the CPU only" in msg and "set weights: dense" in msg
    # auto (the default) resolves to dense on a GPU, so the same placement without a format is fine
    assert load_profile(write(tmp_path, MINIMAL + "placement:\n  draft: [{device: 'cuda:0'}]\n")).models.draft


def test_nccl_is_refused_until_it_is_built(tmp_path):
    text = "models:\n  target: {model: x, weights: dense}\nstrategy: {name: autoregressive}\n" \
           "placement:\n  transport: nccl\n  target: [{device: 'cuda:0'}]\n"
    assert "placement.transport: nccl is not available yet" in problems(write(tmp_path, text))
    assert "use transport: gloo or ray" in problems(write(tmp_path, text))


def test_bad_yaml_names_line_and_column(tmp_path):
    msg = problems(write(tmp_path, "models:\n  target: {model: x\nname: y\n"))
    assert "invalid YAML" in msg and "line 3, column" in msg


def test_duplicate_key(tmp_path):
    msg = problems(write(tmp_path, MINIMAL + "models: {}\n"))
    assert "key 'models' appears twice (first on line 1)" in msg


def test_missing_file_lists_the_shipped_profiles(tmp_path):
    msg = problems(tmp_path / "nope.yaml")
    assert "no such file" in msg and "cpu.yaml" in msg


def test_empty_file_and_non_mapping(tmp_path):
    assert "the file is empty" in problems(write(tmp_path, "# only a comment\n"))
    assert "the top level is a list" in problems(write(tmp_path, "- a\n- b\n"))


def test_explain_without_yaml():
    with pytest.raises(ValidationError) as info:
        Profile.model_validate({"models": {"target": {"model": "x", "weigth": "int4"}},
                                "strategy": {"name": "autoregressive", "k": 0}})
    lines = explain(info.value)
    assert "models.target.weigth: unknown field 'weigth'; did you mean 'weights'?" in lines
    assert "strategy.k: must be >= 1, got 0; set it to 1 or more" in lines


def test_resolve_device():
    import torch

    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_runtime_stays_free_of_yaml_and_pydantic():
    runtime = Path(__file__).parent.parent / "outrider" / "runtime"
    for f in runtime.glob("*.py"):
        text = f.read_text()
        assert "import yaml" not in text and "pydantic" not in text, f


# --- memory ---------------------------------------------------------------------------------------------------

@pytest.fixture
def smollm() -> str:
    """The tiny profile's model, pulled and verified: a missing model fails with the fix, never skips."""
    present = any(m["name"] == SMOLLM and m["present"] for m in hub.list_models())
    assert present, f"{SMOLLM} is not pulled: run `outrider models pull {SMOLLM}` (make test does)"
    return SMOLLM


def with_limits(profile: Profile, **limits) -> Profile:
    return profile.model_copy(update={"scheduler": profile.scheduler.model_copy(update=limits)})


@pytest.mark.usefixtures("smollm")
def test_memory_needed_on_tiny_is_plausible():
    profile = load_profile(TINY)
    needs = memory_needed(profile)
    (target,), (draft,) = needs["target"], needs["draft"]
    assert target.error is None and target.layers == (0, 30)
    # SmolLM2-135M: int8 linears ~1 byte/weight + the bf16 embedding; int4 is smaller.
    assert 150e6 < target.weight_bytes < 250e6 and 0 < draft.weight_bytes < target.weight_bytes
    # 2 (K, V) * 30 layers * 3 kv heads * 64 head_dim * 2 bytes * 512 positions * 16 slots
    assert target.kv_bytes == draft.kv_bytes == 2 * 30 * 3 * 64 * 2 * 512 * 16
    doubled = memory_needed(with_limits(profile, max_running=32))["target"][0]
    assert doubled.kv_bytes == 2 * target.kv_bytes and doubled.weight_bytes == target.weight_bytes


@pytest.mark.usefixtures("smollm")
def test_split_stages_add_up_to_the_whole_model(tmp_path):
    text = TINY.read_text().replace("- {device: cpu, num_cpus: 1, threads: 1}\n  draft:",
                                    "- {device: cpu, layers: [0, 12]}\n    - {device: cpu, layers: [12, 30]}\n  draft:")
    whole = memory_needed(load_profile(TINY))["target"][0]
    first, last = memory_needed(load_profile(write(tmp_path, text)))["target"]
    assert first.weight_bytes + last.weight_bytes == whole.weight_bytes
    assert first.kv_bytes + last.kv_bytes == whole.kv_bytes
    short = text.replace("[12, 30]", "[12, 20]")
    (line,) = [f for f in fits(load_profile(write(tmp_path, short, "short.yaml")), [cpu_info()])
               if f.role == "target" and f.index == 1]
    assert not line.ok and "placement.target[1].layers" in line.message and "end the last stage at 30" in line.message


def test_weight_estimate_matches_the_served_layout(smollm):
    """Linears cost 1/2 (int8) and ~5/16 (int4: half a byte + bf16 scale and zero per 32) of dense bf16; where a
    converted-weights cache exists (written by load_model from the real kernels) its size is the ground truth."""
    from outrider.runtime.loading import converted_cache_path

    config, _ = model_config(smollm)
    layers = range(config.num_layers)
    sizes = {f: weight_bytes(config, f, "bfloat16", layers) for f in ("dense", "int8", "int4")}
    embed = config.vocab_size * config.hidden_size * 2  # the bf16 embedding, the same in every format
    assert (sizes["int8"] - embed) / (sizes["dense"] - embed) == pytest.approx(0.5, abs=0.01)
    assert (sizes["int4"] - embed) / (sizes["dense"] - embed) == pytest.approx(0.3125, abs=0.01)
    import torch

    for fmt, size in sizes.items():
        cache = converted_cache_path(hub.resolve(smollm), torch.bfloat16, fmt)
        if cache.exists():  # safetensors adds a JSON header of some kB
            assert size <= cache.stat().st_size < size * 1.001, fmt


def test_absent_model_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTRIDER_HOME", str(tmp_path))  # no built-in model is downloaded there
    needs = memory_needed(load_profile(TINY))
    assert all(n.error and "outrider models pull" in n.error for n in needs["target"] + needs["draft"])
    assert not any(f.ok for f in fits(load_profile(TINY), [cpu_info()]))


# --- devices and fit ------------------------------------------------------------------------------------------

def test_discover_has_the_cpu():
    cpu = discover()[0]
    assert cpu.name == "cpu" and cpu.kind == "cpu" and cpu.cores >= 1
    assert 0 < cpu.free_bytes <= cpu.total_bytes


def test_no_gpu_is_a_reason_not_an_error():
    gpus, why = nvidia_gpus()
    assert gpus or (why and why.startswith("no NVIDIA GPU"))


@pytest.mark.parametrize("env, expected", [("1,0", [1, 0]), ("", []), ("-1", []), ("0,5,1", [0]),
                                           ("GPU-8f2c", [0, 1])])
def test_cuda_visible_devices_numbering(monkeypatch, env, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert _visible(2) == expected


@pytest.mark.usefixtures("smollm")
def test_cuda1_stage_does_not_fit_a_cpu_only_machine(tmp_path):
    text = TINY.read_text().replace("weights: int4", "weights: dense").replace(
        "  draft:\n    - {device: cpu, num_cpus: 1, threads: 1}", "  draft:\n    - {device: 'cuda:1'}")
    lines = fits(load_profile(write(tmp_path, text)), [cpu_info()])
    target, draft = lines
    assert target.ok and target.needed > 0
    assert not draft.ok and draft.free is None
    assert "placement.draft[0].device is cuda:1, but this machine has no GPUs" in draft.message
    assert "use device: cpu or a machine with 2 GPUs" in draft.message


@pytest.mark.usefixtures("smollm")
def test_stages_on_one_device_share_its_memory():
    profile = load_profile(TINY)
    needed = sum(n.bytes for stages in memory_needed(profile).values() for n in stages)
    small = DeviceInfo("cpu", "cpu", "fake", needed * 2, needed - 1, 2, 2)  # fits each stage, not both
    lines = fits(profile, [small])
    assert not any(f.ok for f in lines) and all("2 stages there need" in f.message for f in lines)
    assert "fix: lower scheduler.max_running" in lines[0].message
    assert all(f.ok for f in fits(profile, [DeviceInfo("cpu", "cpu", "fake", needed, needed, 2, 2)]))


# --- command line ---------------------------------------------------------------------------------------------

def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="outrider")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_profile_check_ok_prints_a_summary(capsys):
    assert run_cli("profile", "check", str(DEFAULT_PROFILE)) == 0
    out = capsys.readouterr().out
    assert f"{DEFAULT_PROFILE}: ok" in out and "qwen2.5-coder-1.5b-instruct (auto, bfloat16)" in out
    assert "mode ray" in out and "vanilla, k 3" in out and "max_running 16" in out and "127.0.0.1:8000" in out


def test_profile_check_prints_every_error(tmp_path, capsys):
    path = write(tmp_path, MINIMAL + "placement:\n  target: [{devcie: cpu}]\nscheduler: {max_running: 0}\n")
    assert run_cli("profile", "check", str(path)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith(f"{path}: line ") for line in err)
    assert run_cli("profile", "check", str(tmp_path / "absent.yaml")) == 2


@pytest.mark.usefixtures("smollm")
def test_profile_check_fit_and_devices(capsys):
    assert run_cli("profile", "check", str(TINY), "--fit") == 0
    assert "target[0] on cpu" in capsys.readouterr().out
    assert run_cli("devices") == 0
    assert capsys.readouterr().out.startswith("cpu ")
    assert run_cli("devices", "--profile", str(TINY)) == 0
    assert capsys.readouterr().out.rstrip().endswith("fits")


def test_devices_with_a_profile_that_needs_more_gpus(tmp_path, capsys):
    if len(nvidia_gpus()[0]) >= 4:
        pytest.skip("this machine has 4 GPUs")
    text = TINY.read_text().replace("weights: int8", "weights: dense").replace("{device: cpu,", "{device: 'cuda:3',", 1)
    assert run_cli("devices", "--profile", str(write(tmp_path, text))) == 2
    assert "does not fit" in capsys.readouterr().out


def test_gpus_read_through_nvml(monkeypatch):
    """The NVML path cannot run on a CPU-only machine, so a fake pynvml stands in for the driver."""
    mem = namedtuple("Mem", "total free used")
    fake = types.SimpleNamespace(
        NVMLError=RuntimeError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: [b"NVIDIA H100", "NVIDIA A10"][h],
        nvmlDeviceGetMemoryInfo=lambda h: mem(80 << 30, (70 - h) << 30, 0))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpus, why = nvidia_gpus()
    assert why is None and [(g.name, g.description, g.free_bytes) for g in gpus] == [("cuda:0", "NVIDIA A10", 69 << 30)]
