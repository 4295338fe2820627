"""`vlcache serve`: an OpenAI-compatible Chat Completions server that reuses image and video states automatically.

This module is the app: its routes (OpenAI's chat and vlcache's image states; vlcache's own endpoints come
from `native`), their error responses, and how uvicorn runs it. What the routes call is in `service`,
requests are parsed in `requests`, media fetched in `fetch`, bodies bounded in `body`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import paths, prompt
from ..engine import Engine
from ..errors import ImageError
from ..media import IMAGE
from . import completions
from .body import BodyLimit, json_body
from .fetch import fetch_image_bytes
from .native import STATES, add_native_routes
from .options import ServeOptions
from .requests import APIError, error_response, parse_chat, valid_id
from .service import Service
from .streaming import unless_disconnected
from .web import HostCheck, add_origin_policy, add_web_page, server_names

__all__ = ["ServeOptions", "create_app", "server_config"]  # ServeOptions: what callers build an app from

log = logging.getLogger("vlcache")
HEADER_SECONDS = 10.0  # a connection whose request headers take longer is closed


def create_app(engine: Engine, options: ServeOptions, on_start: Callable[[Service], object] | None = None) -> FastAPI:
    """The app; `on_start(service)` runs as it starts (before it listens), e.g. compile_in_background."""
    service = Service(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_start is not None:
            on_start(service)
        yield
        service.close()

    app = FastAPI(title="vlcache", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    model_id = options.served_model_name or paths.served_name(engine.model_name)
    token_text = completions.TokenText(engine.processor.tokenizer)  # logprobs' token texts and bytes

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        service.metrics.requests.labels(endpoint=_endpoint(request), status=str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # The log has the details; the answer never does (an OSError's text names the server's files).
        log.error("internal error on %s: %s: %s", _endpoint(request), type(exc).__name__, exc)
        return error_response(500, f"internal error ({type(exc).__name__})", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "fingerprint": engine.fingerprint, "family": engine.family.name,
                "dtype": str(engine.dtype).removeprefix("torch."), "quantization": engine.quantization, "hot_states": service.store.hot_count,
                "hot_bytes": service.store.hot_bytes, "running": service.scheduler.running, "queued": service.scheduler.queued,
                "decode": _decode_status(engine), "context_length": service.context_length,
                "kv": service.scheduler.kv_stats()}

    @app.get("/metrics")
    async def metrics():
        service._gauges()
        return PlainTextResponse(generate_latest(service.metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "vlcache"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        chat = await run_in_threadpool(parse_chat, await json_body(request), options.default_max_tokens)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id}

        def stream(choices, cached):
            return completions.stream(service.metrics, choices, chat, started, head, token_text,
                                      lambda answer: _timings(answer, cached, started), cached)

        async def collect(choices, cached):
            body, answers = await completions.collect(service.metrics, choices, chat, started, request, token_text)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                "system_fingerprint": engine.fingerprint[:16],
                "choices": body,
                "usage": completions.usage(answers, cached),
                "timings": _timings(answers[0], cached, started),
            }

        return await service.respond_choices(request, chat, "/v1/chat/completions", stream, collect)

    @app.post("/v1/images")
    async def upload_image(request: Request):
        # The body first (bounded by --max-body), then admission as a chat has it (a queued image holds its decoded
        # pixels): refused before reading, a client still sending meets a closed socket instead of its 429.
        body = await json_body(request)
        service.admit()
        try:
            if not isinstance(body, dict) or not isinstance(body.get("image"), str):
                raise APIError(400, "send {'image': a data: URL or base64 string, 'system_prompt': optional text}", "image")
            system_prompt = body.get("system_prompt")
            if system_prompt is not None and not isinstance(system_prompt, str):
                raise APIError(400, "'system_prompt' must be a string", "system_prompt")
            url = body["image"] if body["image"].startswith("data:") else "data:;base64," + body["image"]
            data = await service.on_media_thread(fetch_image_bytes, url, options)
            conversation = prompt.image_conversation(system_prompt)
            key, state, cached = await unless_disconnected(request, service.state_for([data], [IMAGE], [conversation]))
            await run_in_threadpool(service.store.share, key)  # this endpoint shares it: listed, and named by id
            service.add_thumbnails([IMAGE], [data])
        except ImageError as exc:
            raise APIError(400, str(exc), "image") from None
        finally:
            service.release()
        return {"id": key, "object": "image_state", "tokens": state.num_tokens, "image_tokens": state.metadata.image_tokens,
                "cached": cached > 0}

    @app.get("/v1/images/{image_id}")
    async def get_image(image_id: str):
        meta = await run_in_threadpool(service.shared_metadata, valid_id(image_id))
        if meta is None:
            raise APIError(404, f"no image state {image_id}", "image_id")
        return {"id": image_id, "object": "image_state", "tokens": meta.prefix_tokens, "image_tokens": meta.image_tokens,
                "system_prompt": meta.system_prompt, "image_sha256": meta.image_sha256, "image_size": meta.image_size,
                "created": meta.created}

    @app.delete("/v1/images/{image_id}")
    async def delete_image(image_id: str):
        key = valid_id(image_id)
        if not await run_in_threadpool(service.store.visible, key) or not await run_in_threadpool(service.store.delete, key):
            raise APIError(404, f"no image state {image_id}", "image_id")
        service._gauges()
        return {"id": image_id, "object": "image_state", "deleted": True}

    add_native_routes(app, service)
    if options.web:
        add_web_page(app)
    add_origin_policy(app, options.cors_origin)
    limited = BodyLimit(app, options.max_body_bytes, uploads=(STATES,))
    return HostCheck(limited, server_names(options.host, options.allowed_hosts))  # outermost: before anything else


def _endpoint(request: Request) -> str:
    """The route's template (/v1/images/{image_id}), never the raw path: metric labels stay few."""
    route = request.scope.get("route")
    return getattr(route, "path", "other")


def _timings(answer, cached: int, started: float) -> dict:
    """llama-server's `timings` beside OpenAI's usage (clients that do not know it ignore it), from this request's
    arrival: prompt_ms until the first token (reading the media, the vision encoder on a miss, the queue, the
    prefill), predicted_ms from the first token to the last; predicted_per_second counts the tokens after the
    first. cache_n: prompt tokens taken from a cached state, prompt_n: those computed."""
    total = time.perf_counter() - started
    cached = min(cached, answer.cached_tokens)  # fewer when the kept conversation was evicted before the row ran
    decode = min(answer.timings.get("decode_s", 0.0), total)  # the scheduler's clock: first token to the answer
    prompt_s, completion = total - decode, len(answer.token_ids)
    computed = answer.prompt_tokens - cached
    return {"cache_n": cached, "prompt_n": computed, "prompt_ms": prompt_s * 1000,
            "prompt_per_second": computed / prompt_s if prompt_s > 0 else 0.0,
            "predicted_n": completion, "predicted_ms": decode * 1000,
            "predicted_per_second": (completion - 1) / decode if completion > 1 and decode > 0 else 0.0}



class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive within HEADER_SECONDS
    (uvicorn itself waits for slow headers forever)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self.loop.call_later(HEADER_SECONDS, self._no_headers, self.cycle)

    def _no_headers(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no new request began meanwhile
            self.transport.close()


def server_config(app, host: str, port: int, **kwargs) -> uvicorn.Config:
    """uvicorn's configuration for vlcache's app: header and keep-alive timeouts against idle connections."""
    return uvicorn.Config(app, host=host, port=port, http=TimedH11Protocol, timeout_keep_alive=5, **kwargs)


def compile_in_background(service: Service, buckets: list[int], backend: str | None = None,
                          max_context: int | None = None) -> threading.Thread:
    """`serve --compile auto`'s first start on a machine: decide the decode step (decode.probe.decide_aside) while
    the server answers with eager steps; the compiled steps take over between two decode steps when ready."""
    from ..decode.probe import Quiet, decide_aside
    from ..decode.step import span_for

    scheduler = service.scheduler

    def on_model_thread(fn):
        return scheduler.call(fn).result()

    def switch(runner, status) -> None:  # on the model thread, between steps
        batch = scheduler._batch  # the running rows' batch (made before the runner existed); later ones get it
        if batch is not None:
            batch.runner = runner

    # Its timing rounds count only while the server has no work (a timing under load must not be remembered).
    quiet = Quiet(idle=lambda: scheduler.idle, activity=lambda: scheduler.activity)
    return decide_aside(service.engine, buckets, on_model_thread, switch, backend,
                        span_for(max_context) if max_context else None, quiet)


def _decode_status(engine) -> dict:
    """The decode step chosen at start, with the (rows, span) shapes compiled so far (all of them before the server
    listens) and dynamo's count of graphs compiled in this process, which stays put while the server runs."""
    from ..decode.step import graphs_compiled

    status = dict(engine.compile_status)
    runner = engine.runner
    if runner is not None:
        shapes = sorted(runner.shapes)
        status.update(shapes=shapes, buckets=sorted({rows for rows, _ in shapes}), compiled_steps=runner.steps,
                      eager_steps_beyond_span=runner.beyond_span)
    status["graphs_compiled"] = graphs_compiled()
    return status
