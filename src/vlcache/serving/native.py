"""vlcache's own endpoints beside the OpenAI ones: what the thin client (`--server URL`) speaks.

- `POST /v1/vlcache/ask`: a question (or the turns of a chat) after a stored state, or a text-only chat;
  the answer as the engine's Answer (token ids, counts, timings), streamed as server-sent events on request.
- `POST /v1/vlcache/states`: a cache file's bytes; checked as any cache file is (header first, never
  unpickled, shapes, this model's fingerprint) and kept under the sha256 of its bytes, which is returned: a
  file's metadata is its sender's word, so an upload answers only requests that name it, never one that
  looks a state up by its image (that could be another client's).
- `GET /v1/vlcache/states`: the states the server holds that a client may ask about by id (not uploads, not
  states of a cache_salt): kind, parts, tokens, size, last use; what the web page offers to pick from.
- `GET /v1/vlcache/thumbs/{sha256}`: a small JPEG of a listed state's image, by the sha256 its part lists.
- `GET /v1/vlcache/states/{id}`: a stored state's file (what `vlcache cache --server` saves).
- `POST /v1/vlcache/cache`: images and videos (base64) and a system prompt; the state is computed (or found)
  and its id returned.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import prompt, storage
from ..errors import ImageError, VlcacheError
from .body import json_body
from .requests import APIError, parse_ask, parse_cache, valid_id
from .service import Service
from .store import StoredState
from .streaming import answer_events, collect_answer, unless_disconnected
from .uploads import receive_upload

log = logging.getLogger("vlcache")
ASK, STATES, CACHE = "/v1/vlcache/ask", "/v1/vlcache/states", "/v1/vlcache/cache"
THUMBS = "/v1/vlcache/thumbs"


def add_native_routes(app: FastAPI, service: Service) -> None:
    options = service.options

    @app.post(ASK)
    async def ask(request: Request):
        started = time.perf_counter()
        chat = parse_ask(await json_body(request), options.default_max_tokens)

        def stream(job, events, cached):
            return _answer_events(service, job, events, cached, started)

        async def collect(job, events, cached):
            _, answer, _ = await collect_answer(service.metrics, job, events, [], started, request)
            return {"answer": _with_cached(answer, cached)}

        return await service.respond(request, chat, ASK, stream, collect)

    @app.post(STATES)
    async def upload_state(request: Request):
        if service.uploading >= options.max_uploads:
            raise APIError(429, f"the server is receiving {service.uploading} uploads; retry shortly",
                           kind="rate_limit_exceeded", headers={"Retry-After": "5"})
        service.uploading += 1
        tmp = service.store.upload_folder() / f".upload-{uuid.uuid4().hex}.tmp"
        try:
            digest, meta = await receive_upload(request, service, tmp)
            try:
                await run_in_threadpool(service.store.add_upload, digest, tmp)
            except Exception as exc:  # noqa: BLE001 - disk full, an object store's error: no path in the answer
                log.warning(f"warning: could not store upload {digest[:12]}: {getattr(exc, 'strerror', None) or exc}")
                raise APIError(507, "the server has no room to store the upload", kind="server_error") from None
            service.metrics.uploads.inc()
        finally:
            service.uploading -= 1
            tmp.unlink(missing_ok=True)
        service.metrics.requests.labels(endpoint=STATES, status="200").inc()
        return {"id": digest, "object": "state", "tokens": meta.prefix_tokens}

    @app.get(STATES)
    async def list_states():
        states = await run_in_threadpool(service.store.listing)
        return {"object": "list", "data": [_listed(s) for s in states]}

    @app.get(THUMBS + "/{digest}")
    async def thumbnail(digest: str):
        """The preview of a listed state's image, by the sha256 its part records (the page's state list)."""
        data = await run_in_threadpool(service.thumbs.get, digest)
        if data is None:
            raise APIError(404, "no thumbnail of that image on this server", "digest")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get(STATES + "/{state_id}")
    async def download_state(state_id: str):
        key = valid_id(state_id, "state_id")
        path = await run_in_threadpool(service.store.path_for, key)
        if path is None:  # a state whose file could not be written (disk full) is sent from memory
            data = await run_in_threadpool(service.store.file_bytes, key)
            if data is None:
                raise APIError(404, f"no state file {state_id} on this server", "state_id")
            return Response(data, media_type="application/octet-stream")
        if storage.is_url(path):
            data = await run_in_threadpool(storage.read_bytes, str(path))
            return Response(data, media_type="application/octet-stream")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{state_id}.safetensors")

    @app.post(CACHE)
    async def cache(request: Request):
        body = await json_body(request)  # the body first: refused before reading, a sender gets a broken pipe, not a 429
        service.admit()  # as a chat is: a queued state holds its decoded media
        try:
            sources, kinds, system_prompt = parse_cache(body)
            covered = [prompt.media_conversation(system_prompt, kinds[: j + 1]) for j in range(len(kinds))]
            key, state, cached = await unless_disconnected(request, service.state_for(sources, kinds, covered))
        except ImageError as exc:
            raise APIError(400, str(exc), "parts") from None
        except VlcacheError as exc:
            raise APIError(400, str(exc)) from None
        finally:
            service.release()
        service.metrics.requests.labels(endpoint=CACHE, status="200").inc()
        return {"id": key, "object": "state", "tokens": state.num_tokens, "image_tokens": state.metadata.image_tokens,
                "frames": sum(p.get("frames", 0) for p in state.metadata.parts), "cached": cached > 0}

    del ask, upload_state, list_states, thumbnail, download_state, cache  # registered on the app


def _listed(state: StoredState) -> dict:
    meta = state.metadata
    parts = [{"type": p["type"], "size": p["size"], "sha256": p.get("sha256"),
              **{k: p[k] for k in ("frames", "duration") if k in p}} for p in meta.parts]
    parts = parts or [{"type": "image", "size": meta.image_size}]  # files before format 3: one image
    kinds = {p["type"] for p in parts}
    return {"id": state.key, "object": "state", "kind": kinds.pop() if len(kinds) == 1 else "mixed", "parts": parts,
            "tokens": meta.prefix_tokens, "bytes": state.bytes, "last_used": round(state.last_used, 3),
            "created": meta.created, "system_prompt": meta.system_prompt, "in_memory": state.in_memory}


def _with_cached(answer, cached: int) -> dict:
    out = answer.to_dict()
    out["cached_tokens"] = cached
    return out


async def _answer_events(service: Service, job, events, cached: int, started: float):
    """Server-sent events: {"text": piece} as the answer grows, then {"text": "", "answer": {...}}."""
    try:
        async for event in answer_events(service.metrics, job, events, [], started):
            if event[0] == "text":
                yield f"data: {json.dumps({'text': event[1]})}\n\n"
            else:
                yield f"data: {json.dumps({'text': '', 'answer': _with_cached(event[1], cached)})}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
    finally:
        job.cancelled.set()
