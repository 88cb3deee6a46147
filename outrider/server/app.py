"""The OpenAI-compatible HTTP server over one `Service`: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics.

A request's life: validate the body (closed pydantic models, 400 on any problem) → tokenize on the loop (small
texts) → `service.submit` (400 on a limit, 429 when the queue is full) → iterate the handle's rounds, turning
token ids into text with the tokenizer's stream decoder and cutting at stop strings. Streaming and non-streaming
responses run the same `Generation`, so their texts are equal by construction. Whatever ends the consumer (done,
stop string, client disconnect, cancellation) reaches `Generation.pieces`' `finally`, which cancels the handle:
the scheduler then aborts the request and frees its KV in both models.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import aclosing, asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from outrider.methods import get_method
from outrider.profile import dotted
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.grammar import Grammar
from outrider.scheduler.serving import QueueFull, RequestFailed, RequestHandle, Unavailable
from outrider.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from outrider.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    Logprobs,
    Outcome,
    error_body,
)
from outrider.server.tools import ToolCallParser, forced_call_grammar, split_calls, template_tools
from outrider.service import Service

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/metrics"})  # everything else needs the API key when one is configured


def create_app(service: Service) -> FastAPI:
    """The app serving `service`; its lifespan runs the scheduler loop (`async with service`)."""
    metrics = ServerMetrics(service.scheduler, service.actor_failures)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.scheduler.after_round.append(metrics.on_round)
        try:
            async with service:
                yield
        finally:
            service.scheduler.after_round.remove(metrics.on_round)

    app = FastAPI(title="Outrider", lifespan=lifespan)
    app.state.service, app.state.metrics = service, metrics
    _add_routes(app)
    _add_error_handlers(app)
    server = service.profile.server
    # add_middleware wraps the app built so far: the last added runs first (CORS, then auth, then the body limit).
    app.add_middleware(BodyLimit, max_bytes=server.max_body_bytes)
    key = os.environ.get(server.api_key_env) if server.api_key_env else None
    if key:
        app.add_middleware(BearerAuth, key=key)
    if server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    return app


# -- routes ------------------------------------------------------------------------------------------------


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        service = _served(request, body.model)
        tok = service.tokenizer
        prompts = [list(p) if isinstance(p, list) else tok.encode(p) for p in body.prompts()]
        echoes = [p if isinstance(p, str) else tok.decode(p) for p in body.prompts()] if body.echo else None
        return await _respond(request, body, prompts, body.requested_max_tokens(), chat=False, echoes=echoes)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        service = _served(request, body.model)
        tok = service.tokenizer
        tools = template_tools(body.tools, body.tool_choice)
        if tools and "tools" not in (tok.chat_template or ""):
            raise APIError(400, "this model's chat template does not describe tools, so the model would never see "
                                "them; serve a model whose template supports tool calling", param="tools")
        try:
            text = tok.apply_chat_template([m.as_template_input() for m in body.messages], tools=tools)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt_ids = tok.encode(text)
        max_tokens = body.requested_max_tokens() or _default_max_tokens(service, len(prompt_ids))
        return await _respond(request, body, [prompt_ids], max_tokens, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service: Service = request.app.state.service
        strategy = service.profile.strategy
        card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "outrider",
                "max_model_len": service.engine.target.capacity,
                "speculation": {"strategy": strategy.name, "lossless": get_method(strategy.name).lossless,
                                "options": strategy.model_dump(exclude={"name"})}}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health(request: Request) -> Response:
        """200 while requests can be served (a recovering draft only pauses speculation), else 503."""
        parts = request.app.state.service.health()
        serving = parts["scheduler"] == "ok" and parts.get("target", "ok") == "ok"
        status = "ok" if all(v == "ok" for v in parts.values()) else "degraded" if serving else "unavailable"
        return JSONResponse({"status": status, **parts}, 200 if serving else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _served(request: Request, model: str | None) -> Service:
    service: Service = request.app.state.service
    if model is not None and model != service.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{service.model_name}`",
                       param="model", code="model_not_found")
    return service


def _default_max_tokens(service: Service, prompt_len: int) -> int:
    """Chat without max_tokens: as much as the context allows, up to the profile's cap."""
    room = service.engine.target.capacity - prompt_len - service.engine.verify_rows
    return max(1, min(service.profile.scheduler.max_tokens, room))


async def _respond(request: Request, body: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
                   max_tokens: int, chat: bool, echoes: list[str] | None = None) -> Response:
    """One choice per (prompt, i < n), all submitted at once so they share rounds; choice index = prompt · n + i."""
    service: Service = request.app.state.service
    env = Envelope.new(service.model_name, chat)
    render = Logprobs(lambda t: service.tokenizer.decode([t], skip_special_tokens=False))
    gens: list[Generation] = []
    try:
        for p, prompt_ids in enumerate(prompts):
            for i in range(body.n):
                index = p * body.n + i
                handle = _submit(service, body, prompt_ids, max_tokens, f"{env.id}-{index}", i)
                gens.append(Generation(handle, prompt_ids, service.tokenizer, body.stop_strings(),
                                       request.app.state.metrics, request.is_disconnected, body.return_token_ids,
                                       index, render if body.logprobs_wanted() is not None else None,
                                       echoes[p] if echoes else None, chat,
                                       chat and body.calls_tools))
    except APIError:
        for gen in gens:  # the choices already submitted give their KV back
            gen.handle.cancel()
        raise
    if body.stream:
        return _SSEResponse(_sse(env, gens, body.include_usage, len(prompts)), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        texts = await asyncio.gather(*(gen.text() for gen in gens))
    except RequestFailed as e:
        raise APIError(500, str(e), "server_error", code="engine_error") from None
    finally:
        for gen in gens:
            gen.handle.cancel()
    return JSONResponse(env.response([gen.outcome(text) for gen, text in zip(gens, texts)], len(prompts)))


def _submit(service: Service, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
            max_tokens: int, request_id: str, choice: int = 0) -> RequestHandle:
    stop_ids = None  # None: the tokenizer's EOS ids
    if body.ignore_eos or body.stop_token_ids:
        eos = () if body.ignore_eos else service.tokenizer.eos_token_ids
        stop_ids = frozenset([*eos, *(body.stop_token_ids or [])])
    grammar = _grammar(service, body)
    try:
        return service.submit(service.request(prompt_ids, max_tokens, body.sampling_params(choice), stop_ids,
                                              body.logprobs_wanted(), body.prompt_logprobs_wanted(), grammar),
                              request_id)
    except ValueError as e:  # a limit (context, max_tokens, vocabulary) or a bad sampling value
        raise APIError(400, str(e)) from None
    except QueueFull as e:
        raise APIError(429, f"the server is at capacity: {e}", "rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except Unavailable as e:
        raise APIError(503, str(e), "server_error", code="model_unavailable", headers={"Retry-After": "5"}) from None


def _grammar(service: Service, body: CompletionRequest | ChatCompletionRequest) -> Grammar | None:
    """What constrains the output: a required tool call, or response_format's JSON (400 when it cannot compile)."""
    forced = forced_call_grammar(body.tools, body.tool_choice, service.tokenizer.token_to_id) \
        if isinstance(body, ChatCompletionRequest) and body.tools else None
    try:
        if forced is not None:
            return service.grammar_lark(forced)
        if body.response_format is not None and body.response_format.structured:
            return service.grammar(body.response_format.schema)
    except ValueError as e:
        raise APIError(400, str(e), param="tools" if forced is not None else "response_format") from None
    return None


# -- one request's generation ------------------------------------------------------------------------------


class StopStrings:
    """Cuts the text before the first stop string. Holds back the last (longest stop − 1) characters, which
    could be the start of a stop string that the next tokens complete, so no stop text is ever emitted."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.pending = ""  # text not emitted yet: no stop string starts in what was emitted before it
        self.hit = False

    def push(self, piece: str) -> str:
        if self.hit:
            return ""
        self.pending += piece
        cut = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        split = len(self.pending) - min(self.hold, len(self.pending))
        out, self.pending = self.pending[:split], self.pending[split:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One choice from its handle to text deltas; records the request's metrics when it ends. With `return_ids`,
    its outcome carries the token ids, with `render` the logprobs, with `echo` (completions) the prompt first;
    `take` hands a stream the ids behind each chunk."""

    def __init__(self, handle: RequestHandle, prompt_ids: list[int], tokenizer: Tokenizer, stops: list[str],
                 metrics: ServerMetrics, is_disconnected: Callable[[], Awaitable[bool]],
                 return_ids: bool = False, index: int = 0, render: Logprobs | None = None,
                 echo: str | None = None, chat: bool = False, tools: bool = False) -> None:
        self.handle, self.prompt_ids, self.metrics = handle, prompt_ids, metrics
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(stops)
        self.is_disconnected = is_disconnected
        self.return_ids, self.index, self.render, self.echo, self.chat = return_ids, index, render, echo, chat
        self.tools = tools  # chat with tools offered: `<tool_call>` blocks become tool_calls
        self.text_seen = ""  # every text delta so far
        # Ids as received, not `handle.token_ids`: the engine may already hold later rounds than we consumed.
        # With a stop string: up to and including the token that completed it.
        self.token_ids: list[int] = []
        self.ids_taken = 0  # token_ids[:ids_taken] went out in earlier chunks
        self.failed = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    async def pieces(self) -> AsyncIterator[str]:
        """Text deltas until the request ends. Raises RequestFailed when the engine fails. Always cancels the
        handle on the way out (a no-op when it finished), so an abandoned request frees its KV."""
        try:
            async for ids in self.handle:
                if text := self._take(ids):
                    self.text_seen += text
                    yield text
                if self.stops.hit or await self.is_disconnected():
                    return
            if tail := self.stops.push(self.decoder.flush()) + self.stops.flush():
                self.text_seen += tail
                yield tail
        except RequestFailed:
            self.failed = True
            raise
        finally:
            self.handle.cancel()
            self._record()

    async def text(self) -> str:
        """The whole completion (the non-streamed response)."""
        async with aclosing(self.pieces()) as pieces:
            return "".join([p async for p in pieces])

    def _take(self, ids: list[int]) -> str:
        """A round's tokens, one at a time up to the one that completes a stop string: the ids kept then do not
        depend on how many tokens the round happened to commit (speculation varies that)."""
        text = ""
        for token in ids:
            self.token_ids.append(token)
            text += self.stops.push(self.decoder.push([token]))
            if self.stops.hit:
                break
        return text

    @property
    def finish_reason(self) -> str:
        reason = "stop" if self.stops.hit else (self.handle.finish_reason or "abort")
        return "tool_calls" if reason == "stop" and self.tools and split_calls(self.text_seen)[1] else reason

    def take(self) -> tuple[list[int] | None, dict[str, Any] | None]:
        """The ids received since the last take (None without return_ids) and their logprobs (None without). A
        round whose text is held back (a possible stop string, an incomplete UTF-8 sequence) makes no chunk; its
        ids ride on the next one."""
        start, self.ids_taken = self.ids_taken, len(self.token_ids)
        ids = self.token_ids[start:self.ids_taken]
        return (ids if self.return_ids else None), (self._logprobs(start, self.ids_taken) if ids else None)

    def _logprobs(self, start: int, end: int, offset: int = 0) -> dict[str, Any] | None:
        """Rendered logprobs of completion tokens [start, end) (text offsets from `offset`)."""
        if self.render is None or self.handle.seq is None:
            return None
        entries = self.handle.seq.logprobs[start:end]
        if self.chat:
            return self.render.chat(entries)
        return self.render.completion(entries, self.token_ids[start:end], offset)

    def echoed(self) -> tuple[str, dict[str, Any] | None]:
        """(completions with echo) the prompt's text and its tokens' logprobs."""
        if self.render is None or self.handle.seq is None:
            return self.echo or "", None
        return self.echo or "", self.render.completion(self.handle.seq.prompt_logprobs, self.prompt_ids)

    def outcome(self, text: str = "") -> Outcome:
        h = self.handle
        ids = (list(self.token_ids), list(self.prompt_ids)) if self.return_ids else (None, None)
        logprobs = self._logprobs(0, len(self.token_ids))
        if self.echo is not None:
            prompt_text, prompt_logprobs = self.echoed()
            text = prompt_text + text
            if logprobs is not None and prompt_logprobs is not None:
                logprobs = self.render.completion(h.seq.prompt_logprobs + h.seq.logprobs[:len(self.token_ids)],
                                                  self.prompt_ids + self.token_ids)
        calls = None
        if self.tools:
            content, parsed = split_calls(self.text_seen)
            if parsed:
                text, calls = content, [c.as_openai() for c in parsed]
        return Outcome(text, self.finish_reason, self.prompt_tokens, self.completion_tokens, h.stats, h.ttft, *ids,
                       index=self.index, logprobs=logprobs, tool_calls=calls)

    def _record(self) -> None:
        if self.failed:
            self.metrics.on_request_failed()
            return
        h = self.handle
        self.metrics.on_request_end(self.finish_reason, self.prompt_tokens, self.completion_tokens, h.created,
                                    h.first_token_at, h.finished_at or time.perf_counter(),
                                    h.stats.cached_prompt_tokens)


async def _choice_events(env: Envelope, gen: Generation) -> AsyncIterator[dict[str, Any]]:
    """One choice's chunks: (chat) its role, (echo) the prompt, its text deltas, its finish with the stats."""
    if env.chat:
        yield env.chunk(None, role=True, index=gen.index)
    if gen.echo is not None:
        text, logprobs = gen.echoed()
        yield env.chunk(text, index=gen.index, logprobs=logprobs, token_ids=[] if gen.return_ids else None)
    parser = ToolCallParser() if gen.tools else None
    async with aclosing(gen.pieces()) as pieces:
        async for piece in pieces:
            ids, logprobs = gen.take()
            calls = []
            if parser is not None:
                piece, done = parser.push(piece)
                calls = [c.as_openai(len(parser.calls) - len(done) + i) for i, c in enumerate(done)]
            if piece or ids or logprobs:
                yield env.chunk(piece, token_ids=ids, index=gen.index, logprobs=logprobs)
            if calls:
                yield env.chunk(None, index=gen.index, tool_calls=calls)
    if parser is not None and (rest := parser.flush()):
        yield env.chunk(rest, index=gen.index)
    ids, logprobs = gen.take()  # the ids of rounds that made no text chunk
    yield env.final_chunk(gen.outcome(), ids, logprobs)


async def _sse(env: Envelope, gens: list[Generation], include_usage: bool, prompts: int) -> AsyncIterator[str]:
    """The SSE body: each choice's chunks as they come (choices interleave), then (include_usage) a usage chunk,
    then `[DONE]`. A failure after the stream started becomes an error event before `[DONE]`."""
    try:
        async for event in _merged([_choice_events(env, g) for g in gens]):
            yield _event(event)
        if include_usage:
            yield _event(env.usage_chunk([g.outcome() for g in gens], prompts))
    except RequestFailed as e:
        yield _event(error_body(str(e), "server_error", code="engine_error"))
    except Exception:  # noqa: BLE001 — a bug ends this stream with an error event, never the server
        log.exception("stream %s failed", env.id)
        yield _event(error_body("internal server error", "server_error", code="internal_error"))
    finally:
        for gen in gens:
            gen.handle.cancel()
    yield "data: [DONE]\n\n"


async def _merged(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """The items of several async iterators as each produces them; the first error ends all of them."""
    if len(streams) == 1:  # the common case: no task in between
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async with aclosing(stream) as it:
                async for item in it:
                    await queue.put(item)
        except Exception as e:  # noqa: BLE001 — handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """Closes its body generator whatever ends the response (a disconnect cancels the send loop instead), so
    `Generation.pieces`' finally, which cancels the handle, runs now rather than at garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# -- errors ------------------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        # 400 like vLLM and OpenAI, not FastAPI's 422; the message names the field.
        message, param = _explain(e.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)  # the traceback stays in the server log
        return JSONResponse(error_body("internal server error", "server_error"), 500)


def _explain(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic errors → one message naming each field, and the first field as `param`."""
    lines, params = [], []
    for err in errors[:4]:
        loc = tuple(err.get("loc", ()))[1:]  # drop "body"
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        path = dotted(loc) if loc else None
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field; this server does not support it"
        lines.append(f"{path}: {msg}" if path else msg)
        params.append(path)
    return "; ".join(lines) or "invalid request body", next((p for p in params if p), None)


# -- middleware (plain ASGI, so streaming and disconnect detection pass through untouched) -------------------


class BodyLimit:
    """413 for a body over `max_bytes`: by its Content-Length before reading, else by counting what arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._reject(scope, receive, send)
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body exceeds {self.max_bytes} bytes (profile server.max_body_bytes)"
        response = JSONResponse(error_body(message, "invalid_request_error", code="request_too_large"), 413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the connection's own messages (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BearerAuth:
    """401 unless `Authorization: Bearer <key>`; every path but PUBLIC_PATHS is guarded (fail closed)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            body = error_body("missing or wrong API key: send `Authorization: Bearer <key>`",
                              "authentication_error", code="invalid_api_key")
            response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
