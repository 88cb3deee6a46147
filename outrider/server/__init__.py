"""The OpenAI-compatible HTTP server: `create_app(service)` (outrider.server.app) and the `outrider serve` command
(outrider.server.cli). Nothing is imported eagerly, so registering the CLI does not load FastAPI or torch."""
from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from outrider.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
