"""`outrider serve --profile P [--host H] [--port N]`: load the profile's models and serve the OpenAI API."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from outrider.profile import DEFAULT_PROFILE, Profile, load_profile

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
    from outrider.service import Service

    profile = load_profile(a.profile)
    host = a.host or profile.server.host
    port = profile.server.port if a.port is None else a.port
    _warn_if_open(profile)
    service = Service.start(profile)
    try:
        app = create_app(service)
        print(f"outrider: serving {service.model_name} at {_url(host, port)}/v1 "
              f"(models loaded in {service.load_seconds:.1f}s; metrics at {_url(host, port)}/metrics)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        service.shutdown()
    return 0


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _warn_if_open(profile: Profile) -> None:
    env = profile.server.api_key_env
    if env and not os.environ.get(env):
        print(f"outrider: warning: ${env} is not set, so the API is served WITHOUT authentication; "
              f"export {env}=<key> to require `Authorization: Bearer <key>`", file=sys.stderr)
