"""`vlcache serve`: an OpenAI-compatible Chat Completions server that reuses image states automatically.

A request's conversation is split at its image: everything up to and including the image is a state, keyed
by what decides its tokens (model fingerprint, image bytes, the messages before it, processor settings). A
known state skips the vision encoder and the prefix prefill; only the rest of the conversation is computed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import torch

from .. import images, prompt
from ..engine import Engine, GenerationOptions
from ..errors import ImageError, VlcacheError
from .store import KEY_PATTERN, Continuation, StateStore, state_key
from .scheduler import Job, Scheduler, Stats

MAX_TOKENS_CAP = 8192


@dataclass
class ServeOptions:
    cache_dir: Path
    memory_budget: int
    allow_remote_images: bool = False
    allow_local_files: Path | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_batch: int = 16
    max_queue: int = 64  # questions waiting beyond the running batch; more get 429
    prefill_chunk: int = 256  # tokens of prefill work between two decode steps
    default_max_tokens: int = 512


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- requests ------------------------------------------------------------------------------------------------

@dataclass
class ChatRequest:
    messages: list[dict]  # the chat template's form; the image as {"type": "image"}
    image_url: str | None
    image_at: tuple[int, int] | None  # (message, part) of the image
    options: GenerationOptions
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_chat(body: object, default_max_tokens: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    messages, found = [], []
    for i, message in enumerate(raw):
        messages.append(_message(message, i, found))
    if len(found) > 1:
        raise APIError(400, "one image per conversation is supported", "messages")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    options = GenerationOptions(
        max_new_tokens=_number(max_tokens, "max_tokens", int, 1, MAX_TOKENS_CAP),
        temperature=_number(body.get("temperature"), "temperature", float, 0, 2),
        top_p=_number(body.get("top_p"), "top_p", float, 0, 1),
        seed=_number(body.get("seed"), "seed", int, -(2**63), 2**63 - 1),
    )
    if options.top_p == 0:
        raise APIError(400, "top_p must be greater than 0", "top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return ChatRequest(
        messages=messages,
        image_url=found[0][2] if found else None,
        image_at=found[0][:2] if found else None,
        options=options,
        stop=stop,
        stream=bool(body.get("stream", False)),
        include_usage=bool(stream_options.get("include_usage", False)),
    )


def _message(message: object, index: int, found: list) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
        raise APIError(400, f"messages[{index}] needs a role of system, user or assistant", f"messages[{index}]")
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content if role != "user" else [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts", f"messages[{index}].content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise APIError(400, f"messages[{index}].content[{j}].image_url.url is missing", f"messages[{index}].content")
            found.append((index, j, url))
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"messages[{index}].content[{j}] is not a supported part (text, or image_url in a user message)",
                           f"messages[{index}].content")
    if role == "user":
        return {"role": role, "content": parts}
    return {"role": role, "content": "".join(p["text"] for p in parts)}


def _number(value, name: str, kind, low, high):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise APIError(400, f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}", name)
    return kind(value)


# -- images --------------------------------------------------------------------------------------------------

_DATA_URL = re.compile(r"^data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)$", re.DOTALL)


def fetch_image_bytes(url: str, options: ServeOptions) -> bytes:
    """Image bytes from a data: URL; http(s) and local files only where the server allows them."""
    match = _DATA_URL.match(url)
    if match:
        try:
            return base64.b64decode(match.group(3), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URL does not hold valid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        if not options.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled; send a data: URL, or start the server with --allow-remote-images", "messages")
        try:
            with urllib.request.urlopen(url, timeout=15) as response:  # noqa: S310 - scheme checked above
                data = response.read(options.max_body_bytes + 1)
        except OSError as exc:
            raise APIError(400, f"cannot fetch the image: {exc}", "messages") from None
        if len(data) > options.max_body_bytes:
            raise APIError(413, "the remote image is too large", "messages")
        return data
    if options.allow_local_files is None:
        raise APIError(400, "image URLs must be data: URLs (local files need --allow-local-files DIR)", "messages")
    root = options.allow_local_files.resolve()
    path = Path(url.removeprefix("file://")).expanduser()
    path = (root / path if not path.is_absolute() else path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise APIError(400, "the image path is not a file under the allowed folder", "messages")
    return path.read_bytes()


# -- the app -------------------------------------------------------------------------------------------------

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics(Stats):
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("vlcache_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.states = Counter("vlcache_state_lookups", "image state lookups by result", ["result"], registry=self.registry)
        self.hot_bytes = Gauge("vlcache_hot_bytes", "bytes of image states held in memory", registry=self.registry)
        self.hot_states = Gauge("vlcache_hot_states", "image states held in memory", registry=self.registry)
        self.ttft = Histogram("vlcache_time_to_first_token_seconds", "time from request to first token", registry=self.registry,
                              buckets=SECONDS)
        self.running = Gauge("vlcache_running_rows", "rows decoding in the batch", registry=self.registry)
        self.queued = Gauge("vlcache_queued_requests", "questions waiting for a row or in prefill", registry=self.registry)
        self.rejected = Counter("vlcache_rejected_requests", "requests refused with 429 (queue full)", registry=self.registry)
        self.wait = Histogram("vlcache_queue_wait_seconds", "time from request to the start of its prefill",
                              registry=self.registry, buckets=SECONDS)
        self.batch = Histogram("vlcache_batch_size", "rows in each decode step", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))

    def queue_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def batch_size(self, rows: int) -> None:
        self.batch.observe(rows)


class Service:
    """What the routes call: state lookup and creation, and generation through the worker."""

    def __init__(self, engine: Engine, options: ServeOptions):
        self.engine = engine
        self.options = options
        self.store = StateStore(options.cache_dir, options.memory_budget, engine.fingerprint, engine.device, adopt=engine.adopt)
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, max_batch=options.max_batch, prefill_chunk=options.prefill_chunk, stats=self.metrics)
        self._pending: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()
        self.in_flight = 0  # chat requests accepted and not answered yet (event loop only)

    def admit(self) -> None:
        """Count a chat request in flight, or refuse it (429) when the batch and the queue are full."""
        if self.in_flight >= self.options.max_batch + self.options.max_queue:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {self.in_flight} requests in flight; retry shortly",
                           kind="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    async def state_for(self, image_bytes: bytes, prefix_messages: list[dict]):
        """The state for an image and what precedes it: (state, hit), computing and storing it on a miss."""
        loaded = await run_in_threadpool(images.load_image, image_bytes)
        key = state_key(self.engine.fingerprint, loaded.sha256, prefix_messages, self.engine.processor_settings(None))
        state, source = await run_in_threadpool(self.store.get, key)
        self.metrics.states.labels(result=source).inc()
        if state is not None:
            return key, state, True
        with self._lock:  # concurrent misses on one image compute it once
            future = self._pending.get(key)
            owner = future is None
            if owner:
                chunk = self.options.prefill_chunk
                future = asyncio.wrap_future(self.scheduler.compute(
                    lambda: self.engine.cache_prefix_steps(image_bytes, prefix_messages, chunk=chunk)))
                self._pending[key] = future
        try:
            state = await asyncio.shield(future)
        finally:
            if owner:
                with self._lock:
                    self._pending.pop(key, None)
        if owner:
            await run_in_threadpool(self.store.put, key, state)
        self._gauges()
        return key, state, False

    def _gauges(self) -> None:
        self.metrics.hot_bytes.set(self.store.hot_bytes)
        self.metrics.hot_states.set(self.store.hot_count)
        self.metrics.running.set(self.scheduler.running)
        self.metrics.queued.set(self.scheduler.queued)

    async def prepare(self, request: ChatRequest) -> tuple[Job, int, asyncio.Queue]:
        """Build the generation job for a chat request; returns it with its cached-token count and event queue."""
        engine = self.engine
        if request.image_url is None:
            text = prompt.render(engine.processor, request.messages, add_generation_prompt=True)
            new_ids = prompt.encode_text(engine.processor, text).to(engine.device)
            kv, history, delta, group, cached = engine.empty_kv(), new_ids[:, :0], 0, "", 0
            keep = None
        else:
            m, p = request.image_at
            prefix = request.messages[:m] + [{"role": "user", "content": request.messages[m]["content"][: p + 1]}]
            data = await run_in_threadpool(fetch_image_bytes, request.image_url, self.options)
            key, state, hit = await self.state_for(data, prefix)
            try:
                text = prompt.text_after(engine.processor, prefix, request.messages)
            except ValueError:
                raise APIError(400, "the conversation cannot be split at its image with this chat template", "messages") from None
            new_ids = prompt.encode_text(engine.processor, text).to(engine.device)
            kv, history, delta, group = state.kv, state.input_ids, int(state.rope_deltas.view(-1)[0]), key
            cached = state.num_tokens if hit else 0
            # A later turn of a conversation served before: start from where that one ended. Only for requests
            # with an answer after the image: single questions share the image state and batch together.
            # Linear-attention states cannot be cut back to a shared run of tokens: no continuations for them.
            later_turn = any(msg["role"] == "assistant" for msg in request.messages[m + 1:])
            later_turn = later_turn and not engine.family.has_linear_layers
            ids = torch.cat([history, new_ids], dim=1)
            cont_key, cont, same = self.store.best_continuation(key, ids) if later_turn else (None, None, 0)
            same = min(same, ids.shape[1] - 1)
            if cont is not None and same > history.shape[1]:
                kv = await run_in_threadpool(cont.kv_until, same)
                history, new_ids, group, cached = ids[:, :same], ids[:, same:], f"{cont_key}:{same}", same
            keep = None if engine.family.has_linear_layers else self._keeper(key, state, kv, history.shape[1])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(group=group, kv=kv, history=history, new_ids=new_ids, rope_delta=delta, options=request.options, emit=emit,
                  keep=keep)
        return job, cached, events

    def _keeper(self, image_key: str, image_state, prefix_kv: list, prefix_tokens: int):
        """Keeps a finished row as a continuation of the image state (runs on the model thread)."""
        extra = prefix_tokens - image_state.num_tokens  # tokens of a continuation the row started from

        def keep(ids, suffix_kv):
            if extra > 0:  # put the continuation's part in front: the last `extra` of every layer's prefix K/V
                suffix_kv = [(torch.cat([pk[:, :, -extra:], sk], dim=-2), torch.cat([pv[:, :, -extra:], sv], dim=-2))
                             for (pk, pv), (sk, sv) in zip(prefix_kv, suffix_kv)]
            self.store.add_continuation(image_key, Continuation(base=image_state, input_ids=ids, suffix_kv=suffix_kv))

        return keep

def create_app(engine: Engine, options: ServeOptions) -> FastAPI:
    service = Service(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.scheduler.stop()

    app = FastAPI(title="vlcache", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    model_id = engine.model_name

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        service.metrics.requests.labels(endpoint=request.url.path, status=str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "hot_states": service.store.hot_count, "hot_bytes": service.store.hot_bytes}

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
        chat = parse_chat(await _json_body(request), options.default_max_tokens)
        service.admit()
        streaming = False
        try:
            try:
                job, cached, events = await service.prepare(chat)
            except ImageError as exc:
                raise APIError(400, str(exc), "messages") from None
            except VlcacheError as exc:
                raise APIError(400, str(exc)) from None
            service.scheduler.submit(job)
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            service.metrics.requests.labels(endpoint="/v1/chat/completions", status="200").inc()
            if chat.stream:  # the stream counts as in flight until it ends
                stream = _stream(service, job, events, chat, cached, completion_id, created, model_id, started, request)
                streaming = True
                return StreamingResponse(_released(stream, service), media_type="text/event-stream")
            text, answer, finish = await _collect(service, job, events, chat, started, request)
        finally:
            if not streaming:
                service.release()
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
            "system_fingerprint": engine.fingerprint[:16],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(answer, cached),
        }

    @app.post("/v1/images")
    async def upload_image(request: Request):
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise APIError(400, "send {'image': a data: URL or base64 string, 'system_prompt': optional text}", "image")
        system_prompt = body.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise APIError(400, "'system_prompt' must be a string", "system_prompt")
        url = body["image"] if body["image"].startswith("data:") else "data:image/*;base64," + body["image"]
        data = await run_in_threadpool(fetch_image_bytes, url, options)
        try:
            key, state, hit = await service.state_for(data, prompt.image_conversation(system_prompt))
        except ImageError as exc:
            raise APIError(400, str(exc), "image") from None
        return {"id": key, "object": "image_state", "tokens": state.num_tokens, "image_tokens": state.metadata.image_tokens,
                "cached": hit}

    @app.get("/v1/images/{image_id}")
    async def get_image(image_id: str):
        meta = service.store.metadata(_valid_id(image_id))
        if meta is None:
            raise APIError(404, f"no image state {image_id}", "image_id")
        return {"id": image_id, "object": "image_state", "tokens": meta.prefix_tokens, "image_tokens": meta.image_tokens,
                "system_prompt": meta.system_prompt, "image_sha256": meta.image_sha256, "image_size": meta.image_size,
                "created": meta.created}

    @app.delete("/v1/images/{image_id}")
    async def delete_image(image_id: str):
        if not await run_in_threadpool(service.store.delete, _valid_id(image_id)):
            raise APIError(404, f"no image state {image_id}", "image_id")
        service._gauges()
        return {"id": image_id, "object": "image_state", "deleted": True}

    return BodyLimit(app, options.max_body_bytes)


def _valid_id(image_id: str) -> str:
    if not KEY_PATTERN.match(image_id):
        raise APIError(400, "image ids are 64 lowercase hex digits", "image_id")
    return image_id


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


def _usage(answer, cached: int) -> dict:
    completion = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


class _StopText:
    """Applies stop strings to streamed text: what may be shown now, and whether a stop string was reached."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        for stop in self.stops:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.hit = self.text[:at], True
        if self.hit:
            return self._release(len(self.text))
        hold = max((len(s) - 1 for s in self.stops), default=0)  # a stop string may be starting at the end
        return self._release(max(self.sent, len(self.text) - hold))

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out


async def _events(service: Service, job: Job, events: asyncio.Queue, chat: ChatRequest, started: float):
    """Yield ("text", piece) then ("done", answer, finish_reason, stopped); stop strings end a job early."""
    stops = _StopText(chat.stop)
    first = True
    while True:
        kind, value = await events.get()
        if kind == "error":
            raise APIError(500, value, kind="server_error")
        if kind == "delta":
            if first:
                service.metrics.ttft.observe(time.perf_counter() - started)
                first = False
            if not stops.hit:
                piece = stops.feed(value)
                if stops.hit:
                    job.cancelled.set()
                if piece:
                    yield "text", piece
            continue
        tail = stops.flush()
        if tail:
            yield "text", tail
        yield "done", value, "stop" if stops.hit else value.finish_reason, stops.hit
        return


async def _collect(service, job, events, chat, started, request):
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        pieces = []
        async for event in _events(service, job, events, chat, started):
            if event[0] == "text":
                pieces.append(event[1])
            elif not event[3]:  # no stop string cut it: the whole answer's own decoding
                # (streamed pieces can disagree with it where byte-fallback tokens decode differently in context)
                return event[1].text, event[1], event[2]
            else:
                return "".join(pieces), event[1], event[2]
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(request: Request, job: Job, every: float = 0.1) -> None:
    """A client that hangs up on a non-streaming request frees its row (streams notice on their own)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(every)


async def _released(stream, service: Service):
    try:
        async for chunk in stream:
            yield chunk
    finally:
        service.release()


async def _stream(service, job, events, chat, cached, completion_id, created, model_id, started, request):
    def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in _events(service, job, events, chat, started):
            if event[0] == "text":
                yield chunk({"content": event[1]})
            else:
                _, answer, finish, _ = event
                yield chunk({}, finish=finish)
                if chat.include_usage:
                    yield chunk({}, usage=_usage(answer, cached), choices=False)
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind, 'param': None, 'code': None}})}\n\n"
    finally:
        job.cancelled.set()  # a client that went away frees its batch row


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with OpenAI's error shape (413)."""

    def __init__(self, app: FastAPI, limit: int):
        self.app, self.limit = app, limit
        self.state = app.state  # tests reach the service through app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send, drain=False)

    async def _too_large(self, scope, receive, send, drain: bool = True):
        # Read (and drop) what the client is still sending, up to a bound, so that it sees the 413 rather
        # than a connection reset mid-upload.
        drained = 0
        while drain and drained < 4 * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        response = error_response(413, f"request body over the {self.limit:,}-byte limit")
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
