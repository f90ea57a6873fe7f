"""The HTTP routes of ``pg-tune serve`` (Starlette): OpenAI's chat completions, models, health, the playground.

- ``POST /v1/chat/completions``: one image and one prompt per request (``requests.py``); the answer
  as OpenAI's ``chat.completion`` (or, with ``stream: true``, ``chat.completion.chunk`` server-sent
  events ending in ``data: [DONE]``), plus a ``pg_tune`` field: the task the answer was read as, the
  image size, and for detect / refer / segment prompts the parsed objects (label, box in the
  image's pixels ``[x0, y0, x1, y1]``, score, the family's raw tokens, mask as COCO RLE).
- ``GET /v1/models``: the one served model. Both ``/v1`` routes need ``Authorization: Bearer KEY``
  when the server has a key (compared in constant time; never logged nor echoed).
- ``GET /health``: liveness and queue depth, no key needed; ``GET /``: the playground page.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 bad request,
401 key, 404 model, 413 too large, 429 queue full, 503 shutting down, 504 past ``--request-timeout``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pg_tune.data.sample import DataError, Sample
from pg_tune.evaluate.predict import prompt_task
from pg_tune.serve.batcher import Batcher, Job, QueueFull
from pg_tune.serve.engine import Completion, Engine
from pg_tune.serve.images import ImagePolicy, read_image
from pg_tune.serve.playground import PAGE_HEADERS, playground_html
from pg_tune.serve.requests import ChatRequest, Limits, RequestError, parse_chat_request, parse_json_body

log = logging.getLogger("pg_tune.serve")


@dataclass
class ServeSettings:
    """What the routes need besides the engine and the batcher."""

    model_name: str
    limits: Limits
    images: ImagePolicy
    api_key: str | None = None
    request_timeout_s: float = 300.0


class ServeState:
    """The served model and its batcher, shared by the routes; ``draining`` after SIGTERM."""

    def __init__(self, engine: Engine, batcher: Batcher, settings: ServeSettings):
        self.engine = engine
        self.batcher = batcher
        self.settings = settings
        self.draining = False
        self.created = int(time.time())
        self.in_flight = 0


def build_app(engine: Engine, batcher: Batcher, settings: ServeSettings) -> Starlette:
    """The ASGI app. Its lifespan starts the batcher's worker and, at shutdown (after the server has
    let the requests in flight finish), stops it."""
    state = ServeState(engine, batcher, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)
            log.info("batcher stopped; %s", _batch_summary(batcher))

    app = Starlette(
        routes=[
            Route("/", partial(_playground, state=state), methods=["GET"]),
            Route("/health", partial(_health, state=state), methods=["GET"]),
            Route("/v1/models", partial(_models, state=state), methods=["GET"]),
            Route("/v1/chat/completions", partial(_chat, state=state), methods=["POST"]),
        ],
        exception_handlers={RequestError: _request_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.serve = state
    return app


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        RequestError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500
    )


# ---- the routes ----------------------------------------------------------------------------------


async def _playground(request: Request, state: ServeState) -> Response:
    return HTMLResponse(playground_html(), headers=PAGE_HEADERS)


async def _health(request: Request, state: ServeState) -> Response:
    engine, batcher = state.engine, state.batcher
    return JSONResponse(
        {
            "status": "draining" if state.draining else "ok",
            "model": state.settings.model_name,
            "family": engine.family.name,
            "tasks": sorted(engine.family.tasks),
            "auth_required": state.settings.api_key is not None,
            "max_batch": batcher.max_batch,
            "waiting": batcher.waiting,
            "running": batcher.running,
            "batches": {str(size): count for size, count in sorted(batcher.batch_sizes.items())},
            "max_tokens": state.settings.limits.max_tokens,
        }
    )


async def _models(request: Request, state: ServeState) -> Response:
    _authorize(request, state)
    model = {
        "id": state.settings.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "pg_tune",
    }
    return JSONResponse({"object": "list", "data": [model]})


async def _chat(request: Request, state: ServeState) -> Response:
    _authorize(request, state)
    if state.draining:
        raise RequestError(503, "the server is shutting down; retry on another instance")
    settings = state.settings
    body = parse_json_body(await _read_body(request, settings.limits.max_body_bytes))
    chat = parse_chat_request(body, settings.limits)
    if chat.model is not None and chat.model != settings.model_name:
        raise RequestError(
            404,
            f"model {chat.model!r} is not served here; GET /v1/models lists {settings.model_name!r}",
            "model",
        )
    image = await run_in_threadpool(read_image, chat.image_url, settings.limits, settings.images)
    try:
        task = prompt_task(chat.prompt, state.engine.family, chat.task)
    except ValueError as e:
        raise RequestError(400, str(e), "task") from None
    sample = Sample(
        image=image, prefix=chat.prompt, suffix="", source="request", task=task, image_size=image.size
    )
    state.engine.check(sample)
    job = Job(chat, sample, asyncio.get_running_loop())
    try:
        state.batcher.submit(job)
    except QueueFull as e:
        raise RequestError(429, f"the server is busy: {e}; retry shortly") from None
    deadline = job.submitted + settings.request_timeout_s
    if chat.stream:
        return StreamingResponse(
            _stream(job, chat, state, deadline),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    state.in_flight += 1
    try:
        while True:
            kind, payload = await _next_event(job, deadline, settings.request_timeout_s)
            if kind == "done":
                return JSONResponse(_completion_body(payload, chat, state, _completion_id()))
            if kind == "error":
                raise _as_request_error(payload)
    finally:
        state.in_flight -= 1
        job.cancel()  # nothing more to generate for it (a no-op once done)


# ---- helpers -------------------------------------------------------------------------------------


def _authorize(request: Request, state: ServeState) -> None:
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "an API key is required: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise RequestError(401, "invalid API key")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (before reading it all)."""
    declared = request.headers.get("content-length")
    too_large = RequestError(
        413, f"the request body is over the server's {limit:,}-byte limit (--max-body-mb)", "messages"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _next_event(job: Job, deadline: float, timeout_s: float) -> tuple[str, Any]:
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(job.events.get(), remaining)
    except asyncio.TimeoutError:
        job.cancel()
        raise RequestError(
            504, f"no answer within the server's --request-timeout of {timeout_s:g} s"
        ) from None


def _as_request_error(error: Any) -> RequestError:
    if isinstance(error, RequestError):
        return error
    if isinstance(error, DataError):
        return RequestError(400, str(error), "messages")
    log.error("generation failed", exc_info=error)
    return RequestError(500, f"generation failed: {type(error).__name__}: {error}")


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _extra(completion: Completion) -> dict[str, Any]:
    return {
        "task": completion.task,
        "image_size": list(completion.image_size),
        "objects": completion.objects,
        "notes": completion.notes,
    }


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _completion_body(
    completion: Completion, chat: ChatRequest, state: ServeState, cid: str
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.settings.model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(completion),
        "pg_tune": _extra(completion),
    }


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job: Job, chat: ChatRequest, state: ServeState, deadline: float) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: the role, the text as it is written, then the finish reason
    with the ``pg_tune`` field (and usage when ``stream_options.include_usage``), then ``[DONE]``."""
    cid, created, model = _completion_id(), int(time.time()), state.settings.model_name

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice], **extra}  # fmt: skip

    state.in_flight += 1
    sent = ""
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            try:
                kind, payload = await _next_event(job, deadline, state.settings.request_timeout_s)
            except RequestError as e:
                yield _sse(e.body())
                break
            if kind == "delta":
                sent += payload
                yield _sse(chunk({"content": payload}))
            elif kind == "done":
                rest = payload.text[len(sent) :] if payload.text.startswith(sent) else ""
                if rest:
                    yield _sse(chunk({"content": rest}))
                yield _sse(chunk({}, payload.finish_reason, pg_tune=_extra(payload)))
                if chat.include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [], "usage": _usage(payload)})  # fmt: skip
                break
            else:
                yield _sse(_as_request_error(payload).body())
                break
        yield _sse("[DONE]")
    finally:
        state.in_flight -= 1
        job.cancel()  # the client left, or the answer is complete: stop generating it


def _batch_summary(batcher: Batcher) -> str:
    sizes = batcher.batch_sizes
    total = sum(size * count for size, count in sizes.items())
    return f"{total} requests in {sum(sizes.values())} batches (sizes: {dict(sorted(sizes.items()))})"
