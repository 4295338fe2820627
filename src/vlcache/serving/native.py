"""vlcache's own endpoints beside the OpenAI ones: what the thin client (`--server URL`) speaks.

- `POST /v1/vlcache/ask`: a question (or the turns of a chat) after a stored state, or a text-only chat;
  the answer as the engine's Answer (token ids, counts, timings), streamed as server-sent events on request.
- `POST /v1/vlcache/states`: a cache file's bytes; checked as any cache file is (header first, never
  unpickled, shapes, this model's fingerprint) and kept under the sha256 of its bytes, which is returned: a
  file's metadata is its sender's word, so an upload answers only requests that name it, never one that
  looks a state up by its image (that could be another client's).
- `GET /v1/vlcache/states`: the states a client may ask about by id: those made through `/v1/vlcache/cache`
  and `/v1/images` (all with --share-all-states; never uploads or states of a cache_salt): kind, parts,
  tokens, size, creation, newest first, in pages (`limit`, `after`); what the web page offers to pick from.
  A chat completion's state is not among them and is not answered by id: it holds another client's
  conversation and photo, and was found only by its contents.
- `GET /v1/vlcache/thumbs/{sha256}`: a small JPEG of a listed state's image, by the sha256 its part lists.
- `GET /v1/vlcache/states/{id}`: a stored state's file (what `vlcache cache --server` saves), streamed in pieces
  from one open handle; at most --max-downloads at once, each within DOWNLOAD_SECONDS.
- `POST /v1/vlcache/cache`: images and videos (base64) and a system prompt; the state is computed (or found)
  and its id returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import prompt
from ..errors import ImageError, VlcacheError
from .body import json_body
from .requests import APIError, parse_ask, parse_cache, valid_id
from .service import Service
from .store import Download, StoredState
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
        chat = await run_in_threadpool(parse_ask, await json_body(request), options.default_max_tokens)

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
    async def list_states(request: Request):
        limit, after = _page(request.query_params)
        states = await run_in_threadpool(service.store.listing)
        start = 0
        if after is not None:
            start = next((i + 1 for i, s in enumerate(states) if s.key == after), None)
            if start is None:
                raise APIError(400, f"'after' names no listed state: {after}", "after")
        page = states[start : start + limit]
        return {"object": "list", "data": [_listed(s) for s in page], "first_id": page[0].key if page else None,
                "last_id": page[-1].key if page else None, "has_more": start + limit < len(states)}

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
        if service.downloading >= options.max_downloads:
            raise APIError(429, f"the server is sending {service.downloading} state files; retry shortly",
                           kind="rate_limit_exceeded", headers={"Retry-After": "5"})
        if not await run_in_threadpool(service.store.visible, key):
            raise APIError(404, f"no state file {state_id} on this server", "state_id")
        download = await run_in_threadpool(service.store.open_download, key)  # opened once: a delete cannot cut it
        if download is None:
            raise APIError(404, f"no state file {state_id} on this server", "state_id")
        service.downloading += 1
        headers = {"Content-Disposition": f'attachment; filename="{state_id}.safetensors"'}
        if download.size is not None:
            headers["Content-Length"] = str(download.size)
        return DownloadResponse(download, lambda: setattr(service, "downloading", service.downloading - 1), headers)

    @app.post(CACHE)
    async def cache(request: Request):
        body = await json_body(request)  # the body first: refused before reading, a sender gets a broken pipe, not a 429
        service.admit()  # as a chat is: a queued state holds its decoded media
        try:
            sources, kinds, system_prompt = await run_in_threadpool(parse_cache, body)
            covered = [prompt.media_conversation(system_prompt, kinds[: j + 1]) for j in range(len(kinds))]
            key, state, cached = await unless_disconnected(request, service.state_for(sources, kinds, covered))
            await run_in_threadpool(service.store.share, key)  # this endpoint shares it: listed, and named by id
            service.add_thumbnails(kinds, sources)
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


DOWNLOAD_SECONDS = 1800.0  # a download still going after this is cut off (a client that stopped reading holds a slot)


class DownloadResponse(StreamingResponse):
    """A state file sent piece by piece, each read off the event loop and sent once the client took the one
    before (uvicorn's flow control): a client that does not read holds one piece, never the file. The whole
    download must end within DOWNLOAD_SECONDS; then, or when the client leaves, the file is closed."""

    def __init__(self, download: Download, done, headers: dict):
        super().__init__(self._pieces(download), media_type="application/octet-stream", headers=headers)
        self._download, self._done = download, done

    async def _pieces(self, download: Download):
        while (piece := await run_in_threadpool(next, download.pieces, None)) is not None:
            yield piece

    async def __call__(self, scope, receive, send):
        try:
            await asyncio.wait_for(super().__call__(scope, receive, send), DOWNLOAD_SECONDS)
        except asyncio.TimeoutError:
            log.info("a state download was cut off: it took longer than %ss", DOWNLOAD_SECONDS)
        finally:
            await run_in_threadpool(self._download.close)
            self._done()


LIST_LIMIT, LIST_MAX = 100, 1000  # states per page of the listing: default and most


def _page(query) -> tuple[int, str | None]:
    """The listing's `limit` (1..LIST_MAX) and `after` (the last id of the previous page)."""
    raw = query.get("limit", str(LIST_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= LIST_MAX:
        raise APIError(400, f"'limit' must be a whole number from 1 to {LIST_MAX}", "limit")
    after = query.get("after")
    return int(raw), None if after is None else valid_id(after, "after")


def _listed(state: StoredState) -> dict:
    meta = state.metadata
    parts = [{"type": p["type"], "size": p["size"], "sha256": p.get("sha256"),
              **{k: p[k] for k in ("frames", "duration") if k in p}} for p in meta.parts]
    parts = parts or [{"type": "image", "size": meta.image_size}]  # files before format 3: one image
    kinds = {p["type"] for p in parts}
    return {"id": state.key, "object": "state", "kind": kinds.pop() if len(kinds) == 1 else "mixed", "parts": parts,
            "tokens": meta.prefix_tokens, "bytes": state.bytes, "created": meta.created, "system_prompt": meta.system_prompt}


def _with_cached(answer, cached: int) -> dict:
    out = answer.to_dict()
    out["cached_tokens"] = min(cached, answer.cached_tokens)  # fewer when the kept conversation was evicted
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
