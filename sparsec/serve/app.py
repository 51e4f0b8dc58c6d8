"""The HTTP layer of ``sparsec serve``: an ASGI app (Starlette) over one Engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as
server-sent events, or whole), ``GET /v1/models``, ``GET /health``. Every error is an
OpenAI error object with its status (400 bad request or prompt past the context, 401
without the API key, 404 unknown model or route, 405, 429 queue full, 503 engine
stopped, 500 otherwise, with no traceback). The engine runs in its own thread; its
events reach the requests' tasks through one ``EventBridge``, which wakes the event
loop once per batch of events rather than once per event (a decode step of N streams
makes N events). A client that disconnects cancels its request, which frees its slot at
the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sparsec.errors import SparsecError
from sparsec.runtime.engine import DONE, ERROR, TEXT, EngineClosed, QueueFull
from sparsec.serve import openai_api as api
from sparsec.serve.openai_api import ApiError

log = logging.getLogger("sparsec.serve")
# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
MAX_BODY_BYTES = 8 << 20


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _engine_error(exc: BaseException) -> ApiError:
    """An engine exception as the API error the client gets (a prompt past the context
    never gets here: ``Server._submit`` answers it with its own code first)."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type="rate_limit_error", code="queue_full")
    if isinstance(exc, EngineClosed):
        return ApiError(503, str(exc), type="server_error", code="unavailable")
    if isinstance(exc, SparsecError):
        return ApiError(400, str(exc))
    log.exception("request failed", exc_info=exc)
    return ApiError(500, "internal error in the server; see its log", type="server_error")


class EventBridge:
    """Hands events from the engine's thread to asyncio queues of one event loop.

    ``put`` (any thread) appends to a list and schedules one ``_drain`` in the loop if
    none is pending: the engine delivering 16 streams' pieces in a step costs one
    self-pipe write and one loop wake-up instead of 16.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []

    def put(self, queue: asyncio.Queue, event: tuple) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a drain is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class Server:
    """The routes' state: the engine, the model name clients must ask for, the key."""

    def __init__(self, engine, model_name: str, api_key: str | None = None):
        self.engine = engine
        self.model = engine.model
        self.model_name = model_name
        self.api_key = api_key
        self.created = int(time.time())
        self._bridge: EventBridge | None = None

    def _events(self) -> EventBridge:
        if self._bridge is None:  # made in the serving loop, on its first request
            self._bridge = EventBridge(asyncio.get_running_loop())
        return self._bridge

    # ------------------------------------------------------------------ helpers

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise api.bad(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise api.bad("the request body must be a JSON object")
        model = body.get("model")
        if model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return body

    def _submit(self, job: api.Job, listener):
        """Submit ``job`` to the engine; ApiError on a bad prompt or a full queue."""
        param = "messages" if job.kind == "chat" else "prompt"
        try:
            if job.kind == "chat":
                ids = self.model.chat_ids(job.messages)
            else:
                ids = job.prompt if isinstance(job.prompt, list) else self.model.encode(job.prompt)
            room = self.model.max_context - len(ids)
            max_tokens = job.max_tokens if job.max_tokens is not None else room
            if room < 1:
                raise ApiError(
                    400,
                    f"the prompt has {len(ids)} tokens; this model's context is "
                    f"{self.model.max_context} tokens",
                    param=param,
                    code="context_length_exceeded",
                )
            if max_tokens > room:
                raise ApiError(
                    400,
                    f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds this "
                    f"model's context of {self.model.max_context} tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            return self.engine.submit(
                ids, max_new_tokens=max_tokens, listener=listener, **job.engine_kwargs
            )
        except ApiError:
            raise
        except Exception as exc:  # SparsecError, QueueFull, EngineClosed
            raise _engine_error(exc) from exc

    # ------------------------------------------------------------------ routes

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, api.parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, api.parse_chat)

    async def _generate(self, request: Request, parse) -> Response:
        try:
            self._authorize(request)
            job = parse(await self._body(request))
        except ApiError as exc:
            return _error(exc)
        events: asyncio.Queue = asyncio.Queue()
        bridge = self._events()

        def listener(kind, value):  # runs in the engine's thread
            bridge.put(events, (kind, value))

        try:
            handle = self._submit(job, listener)
        except ApiError as exc:
            return _error(exc)
        rid = api.new_id(job.kind)
        if job.stream:
            return StreamingResponse(
                self._stream(job, rid, handle, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return Response(status_code=499)
                    continue
                if kind == DONE:
                    return JSONResponse(api.response(job, rid, self.model_name, value))
                if kind == ERROR:
                    return _error(_engine_error(value))
        finally:
            handle.cancel()  # a no-op once finished; frees the slot if the task died

    async def _stream(self, job, rid, handle, events):
        name = self.model_name
        try:
            if job.kind == "chat":  # the role comes first, as OpenAI sends it
                yield _sse(api.chunk(job, rid, name, text="", first=True))
            while True:
                kind, value = await events.get()
                if kind == TEXT:
                    yield _sse(api.chunk(job, rid, name, text=value))
                elif kind == DONE:
                    finish = api.FINISH_REASONS[value.finish_reason]
                    yield _sse(api.chunk(job, rid, name, finish=finish))
                    if job.include_usage:
                        yield _sse(api.usage_chunk(job, rid, name, value))
                    break
                else:
                    yield _sse(_engine_error(value).body())
                    break
            yield b"data: [DONE]\n\n"
        finally:
            # The client went away (the task is cancelled) or the stream ended.
            handle.cancel()

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "sparsec",
                    }
                ],
            }
        )

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_name,
                "parallel": e.parallel,
                "active": e.active,
                "waiting": e.waiting,
                "finished": e.finished,
                "cancelled": e.cancelled,
            }
        )


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error(ApiError(exc.status_code, message, code=kind))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return _error(ApiError(500, "internal error in the server; see its log", type="server_error"))


def build_app(engine, model_name: str, api_key: str | None = None) -> Starlette:
    """The ASGI app serving ``engine`` under ``model_name`` (key required if given)."""
    server = Server(engine, model_name, api_key)
    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.server = server
    return app
