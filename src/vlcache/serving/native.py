"""vlcache's own endpoints beside the OpenAI ones: what the thin client (`--server URL`) speaks.

- `POST /v1/vlcache/ask`: a question (or the turns of a chat) after a stored state, or a text-only chat;
  the answer as the engine's Answer (token ids, counts, timings), streamed as server-sent events on request.
- `POST /v1/vlcache/states`: a cache file's bytes; checked as any cache file is (header first, never
  unpickled, shapes, this model's fingerprint) and kept under the sha256 of its bytes, which is returned: a
  file's metadata is its sender's word, so an upload answers only requests that name it, never one that
  looks a state up by its image (that could be another client's).
- `GET /v1/vlcache/states/{id}`: a stored state's file (what `vlcache cache --server` saves).
- `POST /v1/vlcache/cache`: images and videos (base64) and a system prompt; the state is computed (or found)
  and its id returned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import prompt, storage
from ..engine import GenerationOptions
from ..errors import CacheFileError, ImageError, VlcacheError
from ..media import IMAGE, VIDEO
from ..state import load_state
from .store import UPLOADS
from .server import (
    MAX_MEDIA_PARTS, MAX_TOKENS_CAP, APIError, BodyTimeout, BodyTooLarge, ChatRequest, Service, _collect, _events,
    _json_body, _message, _number, _valid_id,
)

ASK, STATES, CACHE = "/v1/vlcache/ask", "/v1/vlcache/states", "/v1/vlcache/cache"


def parse_ask(body: object, default_max_tokens: int) -> ChatRequest:
    """{"state": id or null, "messages": [...], "max_new_tokens", "temperature", "top_p", "seed", "stream"}.
    With a state, `messages` are what follows it (user questions, and earlier answers of a chat); without,
    a whole text-only conversation."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    state = body.get("state")
    if state is not None:
        _valid_id(state, "state")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    found: list = []
    messages = [_message(m, i, found) for i, m in enumerate(raw)]
    if found:
        raise APIError(400, f"send images and videos to {CACHE} or /v1/chat/completions, not here", "messages")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's question", "messages")
    if state is not None and any(m["role"] == "system" for m in messages):
        raise APIError(400, "a state holds its own system prompt; send only the turns after it", "messages")
    max_tokens = body.get("max_new_tokens")
    options = GenerationOptions(
        max_new_tokens=_number(default_max_tokens if max_tokens is None else max_tokens, "max_new_tokens", int, 1, MAX_TOKENS_CAP),
        temperature=_number(body.get("temperature"), "temperature", float, 0, 2),
        top_p=_number(body.get("top_p"), "top_p", float, 0, 1),
        seed=_number(body.get("seed"), "seed", int, -(2**63), 2**63 - 1),
    )
    if options.top_p == 0:
        raise APIError(400, "top_p must be greater than 0", "top_p")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    return ChatRequest(messages=messages, media=[], options=options, stop=[], stream=stream, include_usage=False,
                       max_tokens_given=max_tokens is not None, state=state)


def add_native_routes(app: FastAPI, service: Service) -> None:
    options = service.options

    @app.post(ASK)
    async def ask(request: Request):
        started = time.perf_counter()
        chat = parse_ask(await _json_body(request), options.default_max_tokens)

        def stream(job, events, cached):
            return _answer_events(service, job, events, cached, started)

        async def collect(job, events, cached):
            _, answer, _ = await _collect(service, job, events, [], started, request)
            return {"answer": _with_cached(answer, cached)}

        return await service.respond(chat, ASK, stream, collect)

    @app.post(STATES)
    async def upload_state(request: Request):
        folder = service.store.folder
        # Received beside the states when they are local (then renamed into place), else in the temp folder.
        tmp = Path(folder.location if not folder.is_url else tempfile.gettempdir()) / f".upload-{uuid.uuid4().hex}.tmp"
        try:
            digest = await _receive_file(request, tmp, options.max_state_bytes)
            state = await run_in_threadpool(_check_upload, service, tmp)
            target = folder.file(f"{UPLOADS}/{digest}.safetensors")
            if not folder.is_url and not folder.exists(target):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
            await run_in_threadpool(service.store.put_upload, digest, state)  # an object store: written by the store
            service.metrics.uploads.inc()
        finally:
            tmp.unlink(missing_ok=True)
        service.metrics.requests.labels(endpoint=STATES, status="200").inc()
        return {"id": digest, "object": "state", "tokens": state.num_tokens}

    @app.get(STATES + "/{state_id}")
    async def download_state(state_id: str):
        path = await run_in_threadpool(service.store.path_for, _valid_id(state_id, "state_id"))
        if path is None:
            raise APIError(404, f"no state file {state_id} on this server", "state_id")
        if storage.is_url(path):
            data = await run_in_threadpool(storage.read_bytes, str(path))
            return Response(data, media_type="application/octet-stream")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{state_id}.safetensors")

    @app.post(CACHE)
    async def cache(request: Request):
        body = await _json_body(request)
        sources, kinds, system_prompt = _parse_cache(body)
        covered = [prompt.media_conversation(system_prompt, kinds[: j + 1]) for j in range(len(kinds))]
        try:
            key, state, cached = await service.state_for(sources, kinds, covered)
        except ImageError as exc:
            raise APIError(400, str(exc), "parts") from None
        except VlcacheError as exc:
            raise APIError(400, str(exc)) from None
        service.metrics.requests.labels(endpoint=CACHE, status="200").inc()
        return {"id": key, "object": "state", "tokens": state.num_tokens, "image_tokens": state.metadata.image_tokens,
                "frames": sum(p.get("frames", 0) for p in state.metadata.parts), "cached": cached > 0}

    del ask, upload_state, download_state, cache  # registered on the app


def _with_cached(answer, cached: int) -> dict:
    out = answer.to_dict()
    out["cached_tokens"] = cached
    return out


async def _answer_events(service: Service, job, events, cached: int, started: float):
    """Server-sent events: {"text": piece} as the answer grows, then {"text": "", "answer": {...}}."""
    try:
        async for event in _events(service, job, events, [], started):
            if event[0] == "text":
                yield f"data: {json.dumps({'text': event[1]})}\n\n"
            else:
                yield f"data: {json.dumps({'text': '', 'answer': _with_cached(event[1], cached)})}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
    finally:
        job.cancelled.set()


async def _receive_file(request: Request, path, limit: int) -> str:
    """Write the body to `path`; the sha256 of its bytes (the upload's id)."""
    size, digest = 0, hashlib.sha256()
    try:
        with open(path, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the state file is over the server's {limit:,}-byte limit (--max-state-bytes)")
                fh.write(chunk)
                digest.update(chunk)
    except BodyTooLarge as exc:
        raise APIError(413, str(exc)) from None
    except BodyTimeout:
        raise APIError(408, "the state file did not arrive in time") from None
    if size == 0:
        raise APIError(400, "the state file is empty")
    return digest.hexdigest()


def _check_upload(service: Service, path):
    """Validate an uploaded file as any cache file, and against this server's model; its state."""
    try:
        state = service.engine.adopt(load_state(path, device=service.engine.device))
        service.engine.check_state(state, source="the uploaded cache file")
    except CacheFileError as exc:
        raise APIError(400, str(exc).replace(str(path), "the uploaded file"), "file") from None
    except VlcacheError as exc:
        raise APIError(400, str(exc), "file") from None
    return state


def _parse_cache(body: object) -> tuple[list[bytes], list[str], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("parts"), list) or not body["parts"]:
        raise APIError(400, "send {'parts': [{'type': 'image' or 'video', 'data': base64}], 'system_prompt': optional}", "parts")
    if len(body["parts"]) > MAX_MEDIA_PARTS:
        raise APIError(400, f"at most {MAX_MEDIA_PARTS} images and videos per state", "parts")
    system_prompt = body.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise APIError(400, "'system_prompt' must be a string", "system_prompt")
    sources, kinds = [], []
    for i, part in enumerate(body["parts"]):
        if not isinstance(part, dict) or part.get("type") not in (IMAGE, VIDEO) or not isinstance(part.get("data"), str):
            raise APIError(400, f"parts[{i}] needs a type of image or video and base64 data", "parts")
        try:
            sources.append(base64.b64decode(part["data"], validate=True))
        except (binascii.Error, ValueError):
            raise APIError(400, f"parts[{i}].data is not valid base64", "parts") from None
        kinds.append(part["type"])
    return sources, kinds, system_prompt
