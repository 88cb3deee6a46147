"""`outrider serve` refuses a bad start the way a user sees it: the real command in a subprocess exits 2 within a
bound, prints ONE `outrider: error:` line (no traceback) naming the file, the problem and the fix, and leaves
nothing running — no worker, and in ray mode no Ray process of the cluster the command started itself.

Leftovers are found by an environment marker every process the command starts inherits (Ray's GCS, raylet and
workers included), so a stray process is caught whatever its name. With the cluster's GCS gone, no actor or
placement group can outlive the command either."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from conftest import random_state
from gguf_writer import tiny_hf_config, train_tiny_vocab, write_gguf
from tiny_folders import write_tiny_folder

from outrider.bench.served import free_port

LOCAL_LIMIT_S = 60  # import torch + read a tiny profile: seconds; the bound only turns a hang into a failure
RAY_LIMIT_S = 120  # starting a local Ray cluster costs ~7 s here
MARKER = "OUTRIDER_STARTUP_TEST_MARKER"


@dataclass(frozen=True)
class Refusal:
    code: int
    stdout: str
    stderr: str
    error: str  # the one `outrider: error:` line
    ray_started: bool  # a Ray session folder was made under the command's RAY_TMPDIR


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """good/ (a tiny HF folder) and good.gguf, to be copied and damaged per test."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_folder(root / "good", seed=1)
    vocab = train_tiny_vocab()
    cfg = tiny_hf_config("llama", vocab)
    write_gguf(root / "good.gguf", random_state(cfg, 0), cfg, vocab)
    return root


def profile(folder: Path, target: Path | str, *, mode: str = "local", device: str = "cpu", num_cpus: float = 1,
            scheduler: str = "{max_running: 2, max_seq_len: 128, max_tokens: 16}", draft: Path | str | None = None,
            ) -> Path:
    """A profile serving `target` (dense fp32); with `draft`, the vanilla strategy drafting with it."""
    strategy = "{name: vanilla, k: 2}" if draft else "{name: autoregressive}"
    models = f"  target: {{model: '{target}', weights: dense, dtype: float32}}\n"
    if draft:
        models += f"  draft: {{model: '{draft}', weights: dense, dtype: float32}}\n"
    stage = f"[{{device: '{device}', num_cpus: {num_cpus}}}]"
    path = folder / "profile.yaml"
    path.write_text(f"name: startup-test\nmodels:\n{models}placement:\n  mode: {mode}\n  target: {stage}\n"
                    f"  draft: {stage}\nstrategy: {strategy}\nscheduler: {scheduler}\n")
    return path


def serve(profile_path: Path, limit_s: float = LOCAL_LIMIT_S) -> tuple[Refusal, str]:
    """Run `outrider serve` to its exit; returns the refusal and the marker its processes carried."""
    marker = uuid.uuid4().hex
    # No RAY_* from the caller: the command must start (and stop) its own local cluster, not join one. Ray's
    # session files go to a short private folder (its socket paths must stay under 108 bytes).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {MARKER: marker, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ort-")}
    cmd = [sys.executable, "-m", "outrider.cli", "serve", "--profile", str(profile_path), "--port", str(free_port())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
        ray_started = any(Path(env["RAY_TMPDIR"]).glob("ray/session_*"))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"`outrider serve --profile {profile_path}` did not exit within {limit_s}s")
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    errors = [line for line in err.splitlines() if line.startswith("outrider: error: ")]
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), f"not one closing error line:\n{err}"
    assert "serving" not in out, out
    return Refusal(proc.returncode, out, err, errors[0], ray_started), marker


def survivors(marker: str, settle_s: float = 10.0) -> list[str]:
    """Command lines of processes still carrying `marker` once `settle_s` has passed (children may take a moment
    to notice their parent is gone)."""
    deadline = time.monotonic() + settle_s
    while True:
        alive = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.environ().get(MARKER) == marker:
                    alive.append(" ".join(p.info["cmdline"] or [])[:120])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def refused(profile_path: Path, *names: str, limit_s: float = LOCAL_LIMIT_S) -> Refusal:
    """The command refuses `profile_path` with one line containing every one of `names`; nothing survives it."""
    result, marker = serve(profile_path, limit_s)
    for name in names:
        assert name in result.error, f"{name!r} missing from: {result.error}"
    assert survivors(marker) == []
    return result


# --- the profile file itself ----------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_invalid_yaml_names_the_line_and_the_fix(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("models:\n  target: {model: x\n")
    refused(bad, str(bad), "line 3, column 1: invalid YAML", "check indentation")


@pytest.mark.timeout(90)
def test_unknown_field_suggests_the_close_name(tmp_path, models):
    bad = tmp_path / "p.yaml"
    bad.write_text(f"models:\n  target: {{model: '{models / 'good'}'}}\nschedular: {{max_running: 2}}\n")
    refused(bad, str(bad), "line 3: schedular: unknown field 'schedular'", "did you mean 'scheduler'?")


@pytest.mark.timeout(90)
def test_python_object_tag_is_refused_and_never_runs(tmp_path):
    touched = tmp_path / "pwned"
    bad = tmp_path / "p.yaml"
    bad.write_text(f"models:\n  target: !!python/object/apply:os.system ['touch {touched}']\n")
    refused(bad, str(bad), "python/object/apply:os.system", "remove the tag")
    assert not touched.exists()


@pytest.mark.timeout(90)
def test_missing_profile_file_lists_the_shipped_ones(tmp_path):
    refused(tmp_path / "absent.yaml", str(tmp_path / "absent.yaml"), "no such file", "cpu.yaml")


# --- devices and memory: refused before any weight is loaded ------------------------------------------------

@pytest.mark.timeout(90)
def test_device_this_machine_lacks_names_it_and_suggests_cpu(tmp_path, models):
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: cuda:0 on a CPU-only machine
    bad = profile(tmp_path, models / "good", device=absent)
    refused(bad, str(bad), f"placement.target[0].device is {absent}, but this machine has", "use device: cpu")


@pytest.mark.timeout(90)
def test_kv_cache_larger_than_memory_says_needed_free_and_the_fix(tmp_path, models):
    # 4096 slots x 2^20 positions x 512 B (K and V x 2 layers x 2 KV heads x 16 dims x 4 B): 2 TiB of KV.
    bad = profile(tmp_path, models / "good", scheduler="{max_running: 4096, max_seq_len: 1048576}")
    result = refused(bad, str(bad), "placement.target[0]: not enough memory on cpu", "GiB free",
                     "fix: lower scheduler.max_running or max_seq_len")
    assert "KV 2048.00 GiB" in result.error


# --- model files ----------------------------------------------------------------------------------------------

def damaged_folder(models: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(models / "good", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


@pytest.mark.timeout(90)
def test_truncated_safetensors_names_the_file_and_says_refetch(tmp_path, models):
    folder = damaged_folder(models, tmp_path)
    bad = profile(tmp_path, folder)
    refused(bad, str(bad), "models.target.model", str(folder / "model.safetensors"), "truncated", "re-fetch")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cut", [0.5, 0.97])  # inside the metadata; inside the last tensor (header parses)
def test_truncated_gguf_names_the_file_and_says_refetch(tmp_path, models, cut):
    gguf = tmp_path / "cut.gguf"
    data = (models / "good.gguf").read_bytes()
    gguf.write_bytes(data[: int(len(data) * cut)])
    refused(profile(tmp_path, gguf), "models.target.model", str(gguf), "truncated", "re-fetch")


@pytest.mark.timeout(90)
def test_missing_tokenizer_is_refused_before_the_models_load(tmp_path, models):
    folder = tmp_path / "model"
    shutil.copytree(models / "good", folder)
    (folder / "tokenizer.json").unlink()
    bad = profile(tmp_path, folder)
    refused(bad, str(bad), "models.target.model", f"{folder / 'tokenizer.json'}: missing", "save_pretrained")


@pytest.mark.timeout(90)
def test_missing_draft_model_names_the_field_and_the_path(tmp_path, models):
    nowhere = tmp_path / "nowhere"
    bad = profile(tmp_path, models / "good", draft=nowhere)
    refused(bad, str(bad), "models.draft.model", str(nowhere), "does not exist", "give a built-in name")


# --- ray mode: nothing half-started ----------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_ray_mode_corrupt_model_is_refused_before_ray_starts(tmp_path, models):
    folder = damaged_folder(models, tmp_path)
    result = refused(profile(tmp_path, folder, mode="ray"), str(folder / "model.safetensors"), "re-fetch")
    assert not result.ray_started


@pytest.mark.timeout(RAY_LIMIT_S + 30)
def test_ray_placement_the_cluster_cannot_hold_stops_its_cluster(tmp_path, models):
    """D7: Ray really starts, refuses the bundle, and the command takes its whole local cluster down with it."""
    cpus = 64 * (os.cpu_count() or 1)
    bad = profile(tmp_path, models / "good", mode="ray", num_cpus=cpus)
    result = refused(bad, f"needs {cpus} CPU but the Ray cluster has", "lower placement.target[*].num_cpus",
                     limit_s=RAY_LIMIT_S)
    assert result.ray_started  # else this would not test taking a started cluster down


def test_a_stale_ray_session_file_does_not_stop_a_local_start(tmp_path):
    """A head killed without `ray stop` leaves /tmp/ray/ray_current_cluster naming its dead GCS; with no address
    the server must start its own cluster at once, not retry the dead one (Ray's default does, for minutes)."""
    from ray._common.utils import get_ray_address_file

    session = Path(get_ray_address_file(None))
    saved = session.read_bytes() if session.exists() else None
    session.parent.mkdir(parents=True, exist_ok=True)
    session.write_text(f"127.0.0.1:{free_port()}")  # nobody listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = ("import ray; from outrider.actors.placement import connect; connect(); "
            "print('nodes', len(ray.nodes())); ray.shutdown()")
    try:
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert done.returncode == 0 and "nodes 1" in done.stdout, done.stderr[-2000:]
        assert time.monotonic() - t0 < 90
    finally:
        if saved is None:
            session.unlink(missing_ok=True)
        else:
            session.write_bytes(saved)
