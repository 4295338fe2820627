"""Cache files that clients upload (`POST /v1/vlcache/states`), received within bounds: at most
`max_uploads` at once (429 beyond), a declared length over the limit refused before a byte is read, the
header read and checked first (format, this model's fingerprint, every layer's shape and dtype, the
conversation) so that a forged or foreign file is refused before its tensors arrive, then the rest streamed
to a temporary file (never held in memory) at a minimum rate. Nothing is unpickled, nothing loaded: the
state is read when a request names it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..errors import CacheFileError, VlcacheError
from ..header import _MAX_HEADER_BYTES, StateMetadata, _metadata, check_header_bytes
from .body import BodyTimeout, BodyTooLarge
from .requests import APIError
from .service import Service

log = logging.getLogger("vlcache")
SOURCE = "the uploaded cache file"


class _Stream:
    """A request body read in pieces of exactly the size asked for."""

    def __init__(self, request: Request):
        self.chunks = request.stream()
        self.buffer = b""

    async def take(self, n: int) -> bytes:
        """The next n bytes (fewer only where the body ends first)."""
        while len(self.buffer) < n:
            chunk = await anext(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def rest(self):
        if self.buffer:
            yield self.buffer
            self.buffer = b""
        async for chunk in self.chunks:
            yield chunk


async def receive_upload(request: Request, service: Service, path: Path) -> tuple[str, StateMetadata]:
    """Receive a cache file into `path`, checked header first; (the sha256 of its bytes, its metadata)."""
    limit = service.options.max_state_bytes
    too_large = f"the state file is over the server's {limit:,}-byte limit (--max-state-bytes)"
    # 1. A declared length over the limit is refused before a byte is read.
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, too_large)
    try:
        # 2. The header: checked as any cache file's, against this model, and for the size it declares.
        body = _Stream(request)
        head = await body.take(8)
        if not head:
            raise APIError(400, "the state file is empty")
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = await body.take(header_len) if 0 < header_len <= _MAX_HEADER_BYTES else b""
        meta, declared = _checked_header(service, head, raw, limit)
        if declared > limit:
            raise APIError(413, too_large)
        # 3. The rest, streamed to the file; exactly as long as the header says.
        size, digest = len(head) + len(raw), hashlib.sha256(head + raw)
        with open(path, "wb") as fh:
            fh.write(head + raw)
            async for chunk in body.rest():
                size += len(chunk)
                if size > declared:
                    raise APIError(400, "the state file is longer than its header says", "file")
                fh.write(chunk)
                digest.update(chunk)
    except BodyTooLarge as exc:
        raise APIError(413, str(exc)) from None
    except BodyTimeout:
        raise APIError(408, "the state file did not arrive in time (or slower than the minimum rate)") from None
    except ClientDisconnect:
        log.info("an upload was cut off: the client disconnected")  # one line; nothing is kept
        raise APIError(400, "the upload was cut off") from None
    except OSError as exc:  # the disk is full or the folder not writable: no path in the answer
        log.warning(f"warning: could not receive an upload: {exc.strerror or exc}")
        raise APIError(507, "the server has no room to store the upload", kind="server_error") from None
    if size != declared:
        raise APIError(400, "the state file is truncated (shorter than its header says)", "file")
    return digest.hexdigest(), meta


def _checked_header(service: Service, head: bytes, raw: bytes, limit: int) -> tuple[StateMetadata, int]:
    try:
        header, declared = check_header_bytes(head, raw, limit, SOURCE)
        meta = _metadata(header, SOURCE)
        service.engine.check_header(header, meta, SOURCE)
    except CacheFileError as exc:
        raise APIError(400, str(exc), "file") from None
    except VlcacheError as exc:
        raise APIError(400, str(exc), "file") from None
    if meta.prefix_tokens >= service.context_length:  # no question could follow it
        raise APIError(400, f"{SOURCE} holds {meta.prefix_tokens:,} tokens, the model's whole context "
                            f"({service.context_length:,}) or more", "file")
    return meta, declared
