"""Graceful shutdown for `outrider serve`."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator

import uvicorn


class DrainingServer(uvicorn.Server):
    """On SIGTERM/Ctrl-C uvicorn stops accepting and waits for open responses. After `drain_s` the scheduler
    stops: every request still in flight ends with an error event and `[DONE]` (and frees its KV), instead of
    its connection being cut without a word. Give uvicorn's own `timeout_graceful_shutdown` a few seconds more,
    so those last events still go out."""

    def __init__(self, config: uvicorn.Config, service: Any, drain_s: float) -> None:
        super().__init__(config)
        self.service, self.drain_s = service, drain_s

    async def shutdown(self, sockets: list | None = None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.drain_s, lambda: loop.create_task(self.service.scheduler.stop()))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises the signal after a graceful shutdown, and the handler Ray installs in the driver
        turns SIGTERM into exit status 15. A shutdown that drained and freed everything is a clean exit: 0."""
        with super().capture_signals():
            yield
            getattr(self, "_captured_signals", []).clear()
