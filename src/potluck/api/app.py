"""The FastAPI app: OpenAI-compatible completions, the swarm dashboard, its JSON, health and metrics.

HTTP concerns only: parsing, auth, error bodies, server-sent events. Generation is ``Engine``'s job and the
swarm's state is ``SwarmWatch``'s; either may be absent (``potluck dashboard`` has no model).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from potluck.api import schemas as s
from potluck.api.engine import ContextLengthError, Done, Engine, GenerationRequest, TokenOut
from potluck.api.metrics import ApiMetrics
from potluck.api.swarm_watch import SwarmWatch
from potluck.swarm.routing import MissingBlocksError, format_block_ranges

STATIC = resources.files("potluck.api") / "static"


class ApiError(Exception):
    """Answered with OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, type: str, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            s.ErrorBody.of(self.message, self.type, self.code, self.param), status_code=self.status
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def _as_api_error(e: BaseException) -> ApiError:
    """Map the engine's and the client's failures onto HTTP statuses."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextLengthError):
        return bad_request(str(e), "max_tokens", "context_length_exceeded")
    if isinstance(e, MissingBlocksError):
        return ApiError(
            503,
            f"the swarm cannot serve this model now: no online server holds blocks "
            f"{format_block_ranges(e.missing)} (missing_blocks={e.missing})",
            "service_unavailable",
            "missing_blocks",
        )
    return ApiError(503, f"generation failed: {type(e).__name__}: {e}", "service_unavailable", "swarm_error")


def create_app(
    engine: Engine | None,
    watch: SwarmWatch | None,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
) -> FastAPI:
    metrics = ApiMetrics()
    if engine is not None:
        metrics.bind_active(lambda: engine.active)
        if engine.speculation is not None:
            metrics.bind_speculation(engine.speculation.stats)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if watch is not None:
            watch.start()
        try:
            yield
        finally:
            if watch is not None:
                await watch.stop()

    app = FastAPI(title="potluck", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    served = model_name or (engine.model.name_or_path if engine is not None else None)
    created = s.now()

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.type).inc()
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in errors[:5]
        )
        metrics.errors.labels("invalid_request_error").inc()
        return bad_request(message or "invalid request", loc[0] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), kind).response()

    app.add_middleware(_CountRequests, metrics=metrics)

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_request_error",
                           "invalid_api_key")  # fmt: skip

    def require_engine(model: str) -> Engine:
        if engine is None:
            raise ApiError(
                404, "this server has no model (dashboard only)", "invalid_request_error", "no_model"
            )
        if model not in (served, "default") and model != engine.model.name_or_path:
            raise ApiError(404, f"the model {model!r} does not exist here; this server serves {served!r}",
                           "invalid_request_error", "model_not_found", "model")  # fmt: skip
        return engine

    # --- plain pages --------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "model": served}
        if engine is not None:
            snapshot = engine.model.view.snapshot
            missing = snapshot.missing_blocks()
            body.update(missing_blocks=missing, servers=len(snapshot.servers), active_requests=engine.active)
            if missing:
                body["status"] = "degraded"
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/api/v1/swarm")
    async def swarm() -> JSONResponse:
        if watch is None:
            raise ApiError(404, "no swarm view", "invalid_request_error")
        report = watch.report()
        if report["updated_at"] is None:
            report = await watch.refresh()
        return JSONResponse(report)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- OpenAI API ---------------------------------------------------------------------------------

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> s.ModelList:
        return s.ModelList(data=[s.ModelCard(id=served, created=created)] if served else [])

    @app.post("/v1/completions", dependencies=[Depends(require_key)], response_model=None)
    async def completions(body: s.CompletionRequest, http: Request) -> Any:
        eng = require_engine(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = eng.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]  # type: ignore[union-attr]
        vocab = int(eng.model.config.vocab_size)
        if any(not 0 <= i < vocab for i in ids):
            raise bad_request(f"prompt token ids must be in 0..{vocab - 1}", "prompt")
        request = _generation(body, ids, body.max_tokens, body.logprobs)
        rid, model = s.new_id("cmpl"), body.model
        stream = _events(eng, request, metrics)
        first = await _first(stream)
        if body.stream:

            async def sse() -> AsyncIterator[str]:
                offset = 0
                async for item in _sse_items(first, stream):
                    if isinstance(item, ApiError):  # mid-stream failure: OpenAI's error object, then the end
                        yield json.dumps(s.ErrorBody.of(item.message, item.type, item.code))
                        return
                    if isinstance(item, TokenOut):
                        if not item.text and request.top_logprobs is None:
                            continue
                        logprobs = (
                            _completion_logprobs([item], offset) if request.top_logprobs is not None else None
                        )
                        offset += len(item.text)
                        choice = s.CompletionChoice(text=item.text, logprobs=logprobs)
                        yield _chunk(s.Completion(id=rid, created=s.now(), model=model, choices=[choice]))
                    else:
                        choice = s.CompletionChoice(text="", finish_reason=item.finish_reason)  # type: ignore[arg-type]
                        yield _chunk(s.Completion(id=rid, created=s.now(), model=model, choices=[choice]))
                        if body.include_usage():
                            yield _chunk(
                                s.Completion(
                                    id=rid, created=s.now(), model=model, choices=[], usage=_usage(item)
                                )
                            )
                yield "[DONE]"

            return EventSourceResponse(sse(), sep="\n", ping=15)
        tokens, done = await _collect(first, stream, http)
        choice = s.CompletionChoice(
            text="".join(t.text for t in tokens),
            logprobs=_completion_logprobs(tokens, 0) if request.top_logprobs is not None else None,
            finish_reason=done.finish_reason,  # type: ignore[arg-type]
        )
        return s.Completion(id=rid, created=s.now(), model=model, choices=[choice], usage=_usage(done))

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)], response_model=None)
    async def chat_completions(body: s.ChatCompletionRequest, http: Request) -> Any:
        eng = require_engine(body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        try:
            ids = eng.encode_chat(messages)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        request = _generation(body, ids, body.token_budget(), body.num_logprobs())
        rid, model = s.new_id("chatcmpl"), body.model
        stream = _events(eng, request, metrics)
        first = await _first(stream)
        if body.stream:

            async def sse() -> AsyncIterator[str]:
                def chunk(
                    delta: s.Delta, finish: str | None = None, lp: s.ChoiceLogprobs | None = None
                ) -> str:
                    choice = s.ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=lp)  # type: ignore[arg-type]
                    return _chunk(
                        s.ChatCompletionChunk(id=rid, created=s.now(), model=model, choices=[choice])
                    )

                yield chunk(s.Delta(role="assistant", content=""))
                async for item in _sse_items(first, stream):
                    if isinstance(item, ApiError):  # mid-stream failure: OpenAI's error object, then the end
                        yield json.dumps(s.ErrorBody.of(item.message, item.type, item.code))
                        return
                    if isinstance(item, TokenOut):
                        if item.text or request.top_logprobs is not None:
                            lp = _chat_logprobs([item]) if request.top_logprobs is not None else None
                            yield chunk(s.Delta(content=item.text), lp=lp)
                    else:
                        yield chunk(s.Delta(), item.finish_reason)
                        if body.include_usage():
                            usage = s.ChatCompletionChunk(
                                id=rid, created=s.now(), model=model, choices=[], usage=_usage(item)
                            )
                            yield _chunk(usage)
                yield "[DONE]"

            return EventSourceResponse(sse(), sep="\n", ping=15)
        tokens, done = await _collect(first, stream, http)
        choice = s.ChatChoice(
            message=s.AssistantMessage(content="".join(t.text for t in tokens)),
            logprobs=_chat_logprobs(tokens) if request.top_logprobs is not None else None,
            finish_reason=done.finish_reason,  # type: ignore[arg-type]
        )
        return s.ChatCompletion(id=rid, created=s.now(), model=model, choices=[choice], usage=_usage(done))

    return app


# --- helpers --------------------------------------------------------------------------------------------


def _generation(body: s.CompletionRequest | s.ChatCompletionRequest, ids: list[int], max_tokens: int | None,
                top_logprobs: int | None) -> GenerationRequest:  # fmt: skip
    return GenerationRequest(
        prompt_ids=tuple(ids),
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_sequences(),
        top_logprobs=top_logprobs,
    )


class _CountRequests:
    """Pure ASGI middleware counting requests by route and status (BaseHTTPMiddleware would wrap the streams)."""

    def __init__(self, app: Any, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = getattr(scope.get("route"), "path", "other")  # route templates only: bounded labels
            self.metrics.requests.labels(route, str(status)).inc()


async def _events(
    engine: Engine, request: GenerationRequest, metrics: ApiMetrics
) -> AsyncIterator[TokenOut | Done]:
    """The engine's stream, counted; a consumer that stops early (hang-up) is counted as cancelled."""
    started = time.monotonic()
    first = True
    finished = False
    stream = engine.stream(request)
    try:
        async for item in stream:
            if isinstance(item, TokenOut) and item.token_id >= 0:
                if first:
                    metrics.first_token_seconds.observe(time.monotonic() - started)
                    first = False
            elif isinstance(item, Done):
                finished = True
                metrics.prompt_tokens.inc(item.prompt_tokens)
                metrics.completion_tokens.inc(item.completion_tokens)
                metrics.failovers.inc(item.failovers)
            yield item
    except (GeneratorExit, asyncio.CancelledError):
        if not finished:
            metrics.cancelled.inc()
        raise
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # runs the engine's cancel even on a hang-up


async def _first(stream: AsyncIterator[TokenOut | Done]) -> TokenOut | Done:
    """Wait for the first event before answering, so that a swarm that cannot serve gets a 503, not a 200."""
    try:
        return await anext(stream)
    except Exception as e:
        raise _as_api_error(e) from None


async def _chain(
    first: TokenOut | Done, rest: AsyncIterator[TokenOut | Done]
) -> AsyncIterator[TokenOut | Done]:
    yield first
    if isinstance(first, Done):
        return
    try:
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  # a hang-up closes the engine's stream: cancels the run


async def _sse_items(
    first: TokenOut | Done, rest: AsyncIterator[TokenOut | Done]
) -> AsyncIterator[TokenOut | Done | ApiError]:
    try:
        async for item in _chain(first, rest):
            yield item
    except Exception as e:
        yield _as_api_error(e)


DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there


async def _collect(
    first: TokenOut | Done, rest: AsyncIterator[TokenOut | Done], http: Request
) -> tuple[list[TokenOut], Done]:
    """A whole completion; a client that leaves before the end cancels it (its session closes)."""

    async def gather() -> tuple[list[TokenOut], Done]:
        tokens: list[TokenOut] = []
        async for item in _chain(first, rest):
            if isinstance(item, Done):
                return tokens, item
            tokens.append(item)
        raise ApiError(503, "generation ended without a result", "service_unavailable")

    task = asyncio.ensure_future(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise ApiError(499, "the client closed the request", "invalid_request_error", "client_closed")
    except ApiError:
        raise
    except Exception as e:
        raise _as_api_error(e) from None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _chunk(model: Any) -> str:
    return json.dumps(model.model_dump(mode="json", exclude_none=False), separators=(",", ":"))


def _usage(done: Done) -> s.Usage:
    return s.Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


def _completion_logprobs(tokens: list[TokenOut], offset: int) -> s.CompletionLogprobs:
    out = s.CompletionLogprobs(top_logprobs=[])
    for t in tokens:
        if t.logprob is None:
            continue
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        assert out.top_logprobs is not None
        out.top_logprobs.append(dict(t.top))
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


def _chat_logprobs(tokens: list[TokenOut]) -> s.ChoiceLogprobs:
    content = [
        s.TokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.token.encode()),
            top_logprobs=[s.TopLogprob(token=a, logprob=v, bytes=list(a.encode())) for a, v in t.top],
        )
        for t in tokens
        if t.logprob is not None
    ]
    return s.ChoiceLogprobs(content=content)
