"""Cache files that clients upload (`POST /v1/vlcache/states`): received to a temporary file within the size
limit, then checked as any cache file is (header first, never unpickled) and against this server's model."""

from __future__ import annotations

import hashlib

from fastapi import Request

from ..errors import CacheFileError, VlcacheError
from ..state import load_state
from .body import BodyTimeout, BodyTooLarge
from .requests import APIError
from .service import Service


async def receive_file(request: Request, path, limit: int) -> str:
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


def check_upload(service: Service, path):
    """Validate an uploaded file as any cache file, and against this server's model; its state."""
    try:
        state = service.engine.adopt(load_state(path, device=service.engine.device))
        service.engine.check_state(state, source="the uploaded cache file")
    except CacheFileError as exc:
        raise APIError(400, str(exc).replace(str(path), "the uploaded file"), "file") from None
    except VlcacheError as exc:
        raise APIError(400, str(exc), "file") from None
    return state
