"""`vlcache serve`: an OpenAI-compatible Chat Completions server that reuses image and video states automatically.

A request's conversation is split after its last image or video: everything up to there is a state, keyed by
what decides its tokens (model fingerprint, the bytes of every image and video in it, the messages around
them, processor settings). A known state skips the vision encoder and the prefix prefill; only the rest of the
conversation is computed. Without one, the longest known state that ends after an earlier media part is
continued (a conversation that adds a second image to a cached first computes from the second image on).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import math
import re
import socket
import http.client
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

import torch

from .. import prompt
from ..engine import Engine, GenerationOptions
from ..errors import ImageError, VlcacheError
from ..media import IMAGE, VIDEO, MediaOptions
from .store import KEY_PATTERN, Continuation, StateStore
from .scheduler import Job, Scheduler, Stats

MAX_TOKENS_CAP = 8192
MAX_MEDIA_PARTS = 32  # images and videos in one conversation


@dataclass
class ServeOptions:
    cache_dir: Path | str  # a local folder, or an fsspec URL (s3://bucket/prefix/) several servers share
    memory_budget: int
    allow_remote_images: bool = False
    allow_private_urls: bool = False  # remote images from private, loopback and link-local addresses too
    allow_local_files: Path | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_batch: int = 16
    max_queue: int = 64  # questions waiting beyond the running batch; more get 429
    prefill_chunk: int = 256  # tokens of prefill work between two decode steps
    max_image_pixels: int = 25_000_000  # images and video frames declaring more are refused before decoding
    max_state_bytes: int = 16 * 1024**3  # largest cache file a client may upload
    media: MediaOptions = MediaOptions()  # how videos are sampled (fps, max frames): part of every key
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

@dataclass(frozen=True)
class MediaRef:
    kind: str  # IMAGE or VIDEO
    url: str
    at: tuple[int, int]  # (message, part)


@dataclass
class ChatRequest:
    messages: list[dict]  # the chat template's form; images as {"type": "image"}, videos as {"type": "video"}
    media: list[MediaRef]  # in conversation order
    options: GenerationOptions
    stop: list[str]
    stream: bool
    include_usage: bool
    max_tokens_given: bool = True  # False: the server's default, shortened to fit the context
    salt: str | None = None  # cache_salt or user: states and conversations kept apart from other tenants
    state: str | None = None  # a stored state's id the messages continue (vlcache's own /v1/vlcache/ask)


def parse_chat(body: object, default_max_tokens: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    messages, found = [], []
    for i, message in enumerate(raw):
        messages.append(_message(message, i, found))
    if len(found) > MAX_MEDIA_PARTS:
        raise APIError(400, f"at most {MAX_MEDIA_PARTS} images and videos per conversation, got {len(found)}", "messages")
    n = body.get("n", 1)
    if type(n) is not int or n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    given = max_tokens is not None
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
    stream = body.get("stream", False)
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(stream, bool) or not isinstance(include_usage, bool):  # "false" is a string, not false
        raise APIError(400, "'stream' and 'stream_options.include_usage' must be true or false", "stream")
    salt = body.get("cache_salt", body.get("user"))
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 256):
        raise APIError(400, "'cache_salt' and 'user' must be strings of 1 to 256 characters", "cache_salt")
    return ChatRequest(
        messages=messages,
        media=found,
        options=options,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        max_tokens_given=given,
        salt=salt,
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
        elif kind in ("image_url", "video_url") and role == "user":
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise APIError(400, f"messages[{index}].content[{j}].{kind}.url is missing", f"messages[{index}].content")
            media = IMAGE if kind == "image_url" else VIDEO
            found.append(MediaRef(media, url, (index, j)))
            parts.append({"type": media})
        else:
            raise APIError(400, f"messages[{index}].content[{j}] is not a supported part (text, or image_url and "
                                "video_url in a user message)", f"messages[{index}].content")
    if role == "user":
        return {"role": role, "content": parts}
    return {"role": role, "content": "".join(p["text"] for p in parts)}


def _number(value, name: str, kind, low, high):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number", name)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise APIError(400, f"'{name}' must be a whole number", name)
    if not low <= value <= high:  # exact for any size of int: no float conversion that could overflow
        raise APIError(400, f"'{name}' must be between {low} and {high}", name)
    return kind(value)


# -- images --------------------------------------------------------------------------------------------------

_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)$", re.DOTALL)


def fetch_image_bytes(url: str, options: ServeOptions) -> bytes:
    """Image (or video) bytes from a data: URL; http(s) and local files only where the server allows them."""
    match = _DATA_URL.match(url)
    if match:
        try:
            return base64.b64decode(match.group(3), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URL does not hold valid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        if not options.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled; send a data: URL, or start the server with --allow-remote-images", "messages")
        return fetch_remote(url, options)
    if options.allow_local_files is None:
        raise APIError(400, "image URLs must be data: URLs (local files need --allow-local-files DIR)", "messages")
    root = options.allow_local_files.resolve()
    path = Path(url.removeprefix("file://")).expanduser()
    path = (root / path if not path.is_absolute() else path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise APIError(400, "the image path is not a file under the allowed folder", "messages")
    if path.stat().st_size > options.max_body_bytes:
        raise APIError(413, "the image file is too large", "messages")
    return path.read_bytes()


REMOTE_SECONDS = 20.0  # the whole download, not each read: a slow drip cannot hold a thread longer
_REMOTE_SLOTS = threading.BoundedSemaphore(8)  # downloads at once: the rest of the thread pool stays free
_REMOTE_FAILED = "cannot fetch the image URL"  # one text for every failure: no port scanner


def fetch_remote(url: str, options: ServeOptions) -> bytes:
    """Download an image: http(s) only (redirects too), public addresses only unless --allow-private-urls,
    at most --max-body bytes within REMOTE_SECONDS in total."""
    if not _REMOTE_SLOTS.acquire(timeout=REMOTE_SECONDS):
        raise APIError(503, "too many image downloads at once; retry shortly", "messages", kind="server_error")
    try:
        deadline = time.monotonic() + REMOTE_SECONDS
        opener = urllib.request.build_opener(_CheckedRedirects(options))
        _check_host(url, options)
        try:
            with opener.open(url, timeout=REMOTE_SECONDS) as response:  # noqa: S310 - scheme and host checked
                chunks, size = [], 0
                while True:
                    if time.monotonic() > deadline:
                        raise APIError(400, _REMOTE_FAILED + " (took too long)", "messages")
                    chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > options.max_body_bytes:
                        raise APIError(413, "the remote image is too large", "messages")
                    chunks.append(chunk)
        except (OSError, ValueError, http.client.HTTPException):
            raise APIError(400, _REMOTE_FAILED, "messages") from None
        return b"".join(chunks)
    finally:
        _REMOTE_SLOTS.release()


def _check_host(url: str, options: ServeOptions) -> None:
    """Refuse other schemes, and hosts that resolve to private, loopback or link-local addresses."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise APIError(400, _REMOTE_FAILED, "messages")
    if options.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        raise APIError(400, _REMOTE_FAILED, "messages") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise APIError(400, _REMOTE_FAILED + " (private and local addresses are refused; see --allow-private-urls)",
                           "messages")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to http(s) on an allowed host."""

    def __init__(self, options: ServeOptions):
        self.options = options

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_host(newurl, self.options)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


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
        self.uploads = Counter("vlcache_state_uploads", "cache files uploaded by clients (--server)", registry=self.registry)
        self.write_errors = Gauge("vlcache_state_write_errors", "states that could not be written to --cache-dir "
                                  "(disk full, read-only) and are served from memory only", registry=self.registry)

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

    def keys(self, digests: list[tuple[str, str]], prefixes: list[list[dict]], salt: str | None) -> list[str]:
        """The key of the state ending after each media part: (kind, sha256) of the parts up to it, the
        messages it covers, the settings that decide their tokens."""
        return [self.engine.state_key(digests[: j + 1], prefixes[j], self.options.media, salt) for j in range(len(digests))]

    async def state_for(self, sources: list[bytes], kinds: list[str], prefixes: list[list[dict]], salt: str | None = None):
        """The state for a conversation up to its last image or video: (key, state, cached tokens), computing
        and storing it on a miss, from the longest known state that ends after an earlier media part.

        `prefixes[j]` is the conversation up to and including media part j. Keys hash the encoded bytes:
        nothing is decoded unless a state must be computed, and decoding happens on the model thread only.
        """
        digests = [(kind, hashlib.sha256(data).hexdigest()) for kind, data in zip(kinds, sources)]
        keys = self.keys(digests, prefixes, salt)
        key = keys[-1]
        state, source = await run_in_threadpool(self.store.get, key)
        self.metrics.states.labels(result=source).inc()
        if state is not None:
            return key, state, state.num_tokens
        with self._lock:  # concurrent misses on one conversation compute it once
            task = self._pending.get(key)
            owner = task is None
            if owner:  # a task of its own: a client that hangs up does not cancel what others wait for
                task = asyncio.ensure_future(self._computed(key, sources, prefixes[-1], keys[:-1]))
                self._pending[key] = task
        state = await asyncio.shield(task)
        self._gauges()
        # A request that waited for another's computation computed nothing itself.
        return key, state, state.metadata.reused_tokens if owner else state.num_tokens

    async def _computed(self, key: str, sources: list[bytes], messages: list[dict], earlier: list[str]):
        try:
            state = await self._compute(sources, messages, earlier)
            await run_in_threadpool(self.store.put, key, state)
            return state
        finally:
            with self._lock:
                self._pending.pop(key, None)

    async def _compute(self, sources: list[bytes], messages: list[dict], earlier: list[str]):
        """Compute a state on the model thread, continuing the longest known state among `earlier` keys."""
        base = None
        if self.engine.family.extends:
            for key in reversed(earlier):
                base, _ = await run_in_threadpool(self.store.get, key)
                if base is not None:
                    break
        # Decoding and the processor run here, beside the model thread: a long video does not pause answers.
        prepared = await run_in_threadpool(self.engine.prepare_media, sources, messages, self.options.media,
                                           self.options.max_image_pixels)
        chunk = self.options.prefill_chunk
        return await asyncio.wrap_future(self.scheduler.compute(lambda: self.engine.prefill_media_steps(prepared, chunk, base)))

    async def respond(self, chat: ChatRequest, endpoint: str, stream, collect):
        """Admit a request (or 429), build and submit its job, then answer it: `stream(job, events, cached)` gives
        the server-sent events of a streaming request (in flight until the stream ends), `collect(...)` the body
        of any other."""
        self.admit()
        streaming = False
        try:
            try:
                job, cached, events = await self.prepare(chat)
            except ImageError as exc:
                raise APIError(400, str(exc), "messages") from None
            except VlcacheError as exc:
                raise APIError(400, str(exc)) from None
            self.scheduler.submit(job)
            self.metrics.requests.labels(endpoint=endpoint, status="200").inc()
            if chat.stream:
                streaming = True
                return StreamingResponse(_released(stream(job, events, cached), self), media_type="text/event-stream")
            return await collect(job, events, cached)
        finally:
            if not streaming:
                self.release()

    def _gauges(self) -> None:
        self.metrics.hot_bytes.set(self.store.hot_bytes)
        self.metrics.hot_states.set(self.store.hot_count)
        self.metrics.running.set(self.scheduler.running)
        self.metrics.queued.set(self.scheduler.queued)
        self.metrics.write_errors.set(self.store.write_errors)

    async def prepare(self, request: ChatRequest) -> tuple[Job, int, asyncio.Queue]:
        """Build the generation job for a chat request; returns it with its cached-token count and event queue."""
        engine = self.engine
        try:
            prompt.check_messages(engine.processor, request.messages)
        except VlcacheError as exc:
            raise APIError(400, str(exc), "messages") from None
        if not request.media and request.state is None:
            new_ids = await run_in_threadpool(self._encode, request.messages, None)
            kv, history, delta, group, cached = engine.empty_kv(), new_ids[:, :0], 0, "", 0
            keep = None
        else:
            key, state, cached, covered, after = await self._base(request)
            new_ids = await run_in_threadpool(self._encode, request.messages, covered)
            kv, history, delta, group = state.kv, state.input_ids, int(state.rope_deltas.view(-1)[0]), key
            cont, same = await self._continuation(request.messages[after + 1:], key, history, new_ids)
            if cont is not None:
                kv = lambda cont=cont, same=same: cont.kv_until(same)  # noqa: E731 - built on the model thread, when the row starts
                ids = torch.cat([history, new_ids], dim=1)
                history, new_ids, group, cached = ids[:, :same], ids[:, same:], f"{cont.key}:{same}", same
            keep = None if engine.family.has_linear_layers else self._keeper(key, state, cont, history.shape[1])
        self._fit_context(request, history.shape[1] + new_ids.shape[1])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(group=group, kv=kv, history=history, new_ids=new_ids, rope_delta=delta, options=request.options, emit=emit,
                  keep=keep)
        return job, cached, events

    async def _base(self, request: ChatRequest):
        """The state a request continues: (key, state, cached tokens, the messages it covers, the index of the
        message where it ends). By id for vlcache's own clients (the request's turns then follow the state's
        conversation), else from the request's images and videos, found or computed."""
        if request.state is not None:
            key, state, cached, covered = await self._stored(request.state)
            request.messages = prompt.append_turns(covered, request.messages)
            return key, state, cached, covered, len(covered) - 1
        covered = [_prefix(request.messages, ref.at) for ref in request.media]
        sources = [await run_in_threadpool(fetch_image_bytes, ref.url, self.options) for ref in request.media]
        key, state, cached = await self.state_for(sources, [ref.kind for ref in request.media], covered, request.salt)
        return key, state, cached, covered[-1], request.media[-1].at[0]

    def _encode(self, messages: list[dict], prefix: list[dict] | None) -> torch.Tensor:
        """Token ids of the conversation after the image prefix (all of it without one); off the event loop."""
        processor = self.engine.processor
        if prefix is None:
            text = prompt.render(processor, messages, add_generation_prompt=True)
        else:
            try:
                text = prompt.text_after(processor, prefix, messages)
            except ValueError:
                raise APIError(400, "the conversation cannot be split at its image with this chat template", "messages") from None
        return prompt.encode_text(processor, text).to(self.engine.device)

    def _fit_context(self, request: ChatRequest, prompt_tokens: int) -> None:
        """Refuse what the model cannot hold; the default answer length shrinks to fit."""
        context = self.context_length
        options = request.options
        if prompt_tokens >= context or (request.max_tokens_given and prompt_tokens + options.max_new_tokens > context):
            raise APIError(400, f"this model's maximum context length is {context:,} tokens; the messages have "
                                f"{prompt_tokens:,} and max_tokens asks for {options.max_new_tokens:,} more", "messages",
                           kind="invalid_request_error")
        options.max_new_tokens = min(options.max_new_tokens, context - prompt_tokens)

    @property
    def context_length(self) -> int:
        return int(getattr(self.engine.model.config.get_text_config(), "max_position_embeddings", None) or 2**31)

    async def _stored(self, key: str):
        """A stored state by id: (key, state, its tokens, the messages it covers); 404 if the server has none."""
        state, source = await run_in_threadpool(self.store.get, _valid_id(key, "state"))
        if state is None:  # an uploaded cache file, named by the hash of its bytes
            state, source = await run_in_threadpool(self.store.get_upload, key)
        self.metrics.states.labels(result=source).inc()
        if state is None:
            raise APIError(404, f"no state {key} on this server; upload its cache file first", "state")
        return key, state, state.num_tokens, state.metadata.messages

    async def _continuation(self, later: list[dict], key: str, history: torch.Tensor, new_ids: torch.Tensor):
        """A kept conversation this request continues, and how many of its tokens to reuse (None, 0 if none).
        `later`: the messages after the state's own.

        Only for requests with an answer after the image (single questions share the image state and batch
        together); never for linear-attention models (their state cannot be cut back to a shared run). The
        reuse ends at a message boundary, never inside a message: otherwise the cached-token count would tell
        a client, token by token, what another client wrote.
        """
        if self.engine.family.has_linear_layers or not any(msg["role"] == "assistant" for msg in later):
            return None, 0
        ids = torch.cat([history, new_ids], dim=1)
        cont, same = self.store.best_continuation(key, ids)
        if cont is None:
            return None, 0
        same = _message_boundary(ids[0].tolist(), min(same, ids.shape[1] - 1), history.shape[1], cont, self.engine.eos_ids)
        return (cont, same) if same > history.shape[1] else (None, 0)

    def _keeper(self, image_key: str, image_state, cont: Continuation | None, prefix_tokens: int):
        """Keeps a finished row as a continuation of the image state (runs on the model thread)."""
        extra = prefix_tokens - image_state.num_tokens  # tokens of a continuation the row started from

        def keep(ids, suffix_kv, answer_start):
            if extra > 0:  # the continuation's part in front: the first `extra` tokens after the image state
                suffix_kv = [(torch.cat([ck[:, :, :extra], sk], dim=-2), torch.cat([cv[:, :, :extra], sv], dim=-2))
                             for (ck, cv), (sk, sv) in zip(cont.suffix_kv, suffix_kv)]
            self.store.add_continuation(image_key, Continuation(base=image_state, input_ids=ids, suffix_kv=suffix_kv,
                                                                answer_start=answer_start))

        return keep


def _prefix(messages: list[dict], at: tuple[int, int]) -> list[dict]:
    """The conversation up to and including the media part at (message, part): its user turn left open."""
    m, p = at
    return messages[:m] + [{"role": "user", "content": messages[m]["content"][: p + 1]}]


def _message_boundary(ids: list[int], same: int, start: int, cont: Continuation, turn_ends: frozenset[int]) -> int:
    """The longest reuse up to `same` tokens that ends where a message ends: after an end-of-turn token, at the
    kept answer's start (its assistant header), or after the whole kept answer when the request's copy of it
    ends there too."""
    best = start
    for i in range(start, same):
        if ids[i] in turn_ends:
            best = i + 1
    if cont.answer_start <= same:
        best = max(best, cont.answer_start)
    if same == cont.num_tokens and same < len(ids) and ids[same] in turn_ends:
        best = same
    return best


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
        service.metrics.requests.labels(endpoint=_endpoint(request), status=str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), kind="invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "fingerprint": engine.fingerprint, "family": engine.family.name,
                "dtype": str(engine.dtype).removeprefix("torch."), "hot_states": service.store.hot_count,
                "hot_bytes": service.store.hot_bytes, "running": service.scheduler.running, "queued": service.scheduler.queued,
                "decode": engine.compile_status}

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
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def stream(job, events, cached):
            return _stream(service, job, events, chat, cached, completion_id, created, model_id, started, request)

        async def collect(job, events, cached):
            text, answer, finish = await _collect(service, job, events, chat.stop, started, request)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                "system_fingerprint": engine.fingerprint[:16],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": None}],
                "usage": _usage(answer, cached),
            }

        return await service.respond(chat, "/v1/chat/completions", stream, collect)

    @app.post("/v1/images")
    async def upload_image(request: Request):
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise APIError(400, "send {'image': a data: URL or base64 string, 'system_prompt': optional text}", "image")
        system_prompt = body.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise APIError(400, "'system_prompt' must be a string", "system_prompt")
        url = body["image"] if body["image"].startswith("data:") else "data:;base64," + body["image"]
        data = await run_in_threadpool(fetch_image_bytes, url, options)
        try:
            key, state, cached = await service.state_for([data], [IMAGE], [prompt.image_conversation(system_prompt)])
        except ImageError as exc:
            raise APIError(400, str(exc), "image") from None
        return {"id": key, "object": "image_state", "tokens": state.num_tokens, "image_tokens": state.metadata.image_tokens,
                "cached": cached > 0}

    @app.get("/v1/images/{image_id}")
    async def get_image(image_id: str):
        meta = await run_in_threadpool(service.store.metadata, _valid_id(image_id))
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

    from .native import STATES, add_native_routes

    add_native_routes(app, service)
    return BodyLimit(app, options.max_body_bytes, uploads=(STATES,))


def _endpoint(request: Request) -> str:
    """The route's template (/v1/images/{image_id}), never the raw path: metric labels stay few."""
    route = request.scope.get("route")
    return getattr(route, "path", "other")


def _valid_id(image_id: object, param: str = "image_id") -> str:
    if not isinstance(image_id, str) or not KEY_PATTERN.fullmatch(image_id):
        raise APIError(400, "state ids are 64 lowercase hex digits", param)
    return image_id


async def _json_body(request: Request):
    try:
        raw = await request.body()
    except BodyTooLarge as exc:  # a chunked body: the size shows only while reading it
        raise APIError(413, str(exc)) from None
    except BodyTimeout:
        raise APIError(408, f"the request body did not arrive within {BODY_SECONDS:.0f} s") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, integers of thousands of digits, nesting too deep
        raise APIError(400, "the request body is not valid JSON (or nests or numbers beyond the limits)") from None


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


async def _events(service: Service, job: Job, events: asyncio.Queue, stop: list[str], started: float):
    """Yield ("text", piece) then ("done", answer, finish_reason, stopped); stop strings end a job early."""
    stops = _StopText(stop)
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


async def _collect(service, job, events, stop: list[str], started, request):
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        pieces = []
        async for event in _events(service, job, events, stop, started):
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
        async for event in _events(service, job, events, chat.stop, started):
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

    def __init__(self, app: FastAPI, limit: int, uploads: tuple[str, ...] = ()):
        self.app, self.limit, self.uploads = app, limit, uploads  # uploads: paths that take files (own limits)
        self.state = app.state  # tests reach the service through app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path") in self.uploads:  # the route limits size; the body may take UPLOAD_SECONDS
            return await self._upload(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        received, complete = 0, False
        deadline = time.monotonic() + BODY_SECONDS

        async def counted():
            nonlocal received, complete
            if complete:  # after the body: waiting for a disconnect, however long the answer takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                complete = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
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


    async def _upload(self, scope, receive, send):
        deadline, complete = time.monotonic() + UPLOAD_SECONDS, False

        async def timed():
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over the {limit:,}-byte limit")


class BodyTimeout(Exception):
    pass


BODY_SECONDS = 60.0  # the whole request body must arrive within this (a slow-loris body is cut off: 408)
UPLOAD_SECONDS = 1800.0  # the same for an uploaded state file (gigabytes over a network)
HEADER_SECONDS = 10.0  # a connection whose request headers take longer is closed


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
