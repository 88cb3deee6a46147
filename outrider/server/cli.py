"""`outrider serve --profile P [--host H] [--port N]`: load the profile's models and serve the OpenAI API."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from outrider.profile import DEFAULT_PROFILE, Profile, ProfileError, load_profile

log = logging.getLogger(__name__)


def register_cli(subparsers: Any) -> None:
    """Add `serve` to the `outrider` sub-command parsers."""
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API (completions, chat, metrics)")
    p.add_argument("--profile", default=str(DEFAULT_PROFILE), help="deployment profile (YAML)")
    p.add_argument("--host", help="address to bind (default: the profile's server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the profile's server.port)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from outrider.server.app import create_app
    from outrider.server.draining import DrainingServer
    from outrider.service import Service

    profile = load_profile(a.profile)
    host = a.host or profile.server.host
    port = profile.server.port if a.port is None else a.port
    _warn_if_open(profile)
    check_startup(profile, a.profile)
    service = Service.start(profile)
    try:
        app = create_app(service)
        print(f"outrider: serving {service.model_name} at {_url(host, port)}/v1 "
              f"(models loaded in {service.load_seconds:.1f}s; metrics at {_url(host, port)}/metrics)", flush=True)
        drain = profile.server.shutdown_timeout_s
        # uvicorn's own limit comes a little after ours, so the error events of ended streams still go out.
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain + 5)
        DrainingServer(config, service, drain).run()
    finally:
        service.shutdown()
    return 0


def check_startup(profile: Profile, path: str | Path) -> None:
    """Fail before any weight is loaded or Ray is started when a model file is absent or damaged, the tokenizer is
    missing, a device does not exist or the profile cannot fit in memory: one ProfileError line naming the
    profile, the field, the problem and the fix, and nothing started that would need stopping."""
    on_this_machine = profile.placement.mode == "local" or not os.environ.get("RAY_ADDRESS")
    for role, spec, _ in profile.roles():
        # On a remote cluster the draft is read by its actor on another node; the target is always read here too
        # (the server tokenizes with it).
        if role == "target" or on_this_machine:
            _check_model(path, role, spec.model, with_tokenizer=role == "target")
    if not on_this_machine:
        return  # the cluster's own nodes decide devices and memory; placement checks them with Ray
    from outrider.devices import cpu_info, fit_problems, local_devices, nvidia_gpus

    # Local mode runs on what this process's torch reaches; a local Ray cluster on what Ray finds (NVML).
    devices = local_devices() if profile.placement.mode == "local" else [cpu_info(), *nvidia_gpus()[0]]
    problems = fit_problems(profile, devices)
    if problems:
        more = f" (and {len(problems) - 1} more: `outrider devices --profile {path}` lists every stage)"
        raise ProfileError(path, [problems[0] + (more if len(problems) > 1 else "")])


def _check_model(path: str | Path, role: str, model: str, with_tokenizer: bool) -> None:
    """Open the checkpoint the way the loader will (headers and metadata only: no tensor is read)."""
    from outrider.hub import resolve
    from outrider.runtime.checkpoint import load_checkpoint
    from outrider.runtime.tokenizer import Tokenizer

    try:
        checkpoint = load_checkpoint(resolve(model))
        if with_tokenizer:
            Tokenizer.load(checkpoint.tokenizer_source)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: unreadable files, FileNotFoundError included
        raise ProfileError(path, [f"models.{role}.model: {e}"]) from e


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _warn_if_open(profile: Profile) -> None:
    env = profile.server.api_key_env
    if env and not os.environ.get(env):
        print(f"outrider: warning: ${env} is not set, so the API is served WITHOUT authentication; "
              f"export {env}=<key> to require `Authorization: Bearer <key>`", file=sys.stderr)
