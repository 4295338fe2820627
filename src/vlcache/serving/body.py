"""Request bodies within bounds: a size limit (413) and a time limit (408) on every body, the longer time of
uploads on the paths that take files, and the JSON body the routes read."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .requests import APIError, error_response

BODY_SECONDS = 60.0  # the whole request body must arrive within this (a slow-loris body is cut off: 408)
UPLOAD_SECONDS = 1800.0  # the same for an uploaded state file (gigabytes over a network)
UPLOAD_IDLE_SECONDS = 30.0  # the longest gap between two pieces of an upload
UPLOAD_GRACE_SECONDS = 10.0  # after this, an upload must have kept up MIN_UPLOAD_RATE on average
MIN_UPLOAD_RATE = 64 * 1024  # bytes a second


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
        started = time.monotonic()
        deadline, complete, received = started + UPLOAD_SECONDS, False, 0

        async def timed():
            nonlocal complete, received
            if complete:
                return await receive()
            # A slow upload holds a socket, a file and an upload slot: after a grace period it must keep up a
            # minimum rate, and no gap may be longer than UPLOAD_IDLE_SECONDS.
            now = time.monotonic()
            behind = started + max(UPLOAD_GRACE_SECONDS, received / MIN_UPLOAD_RATE)  # when the rate falls short
            wait = min(deadline - now, behind - now, UPLOAD_IDLE_SECONDS)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, wait))
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            received += len(message.get("body", b""))
            elapsed = time.monotonic() - started
            if elapsed > UPLOAD_GRACE_SECONDS and received < MIN_UPLOAD_RATE * elapsed:
                raise BodyTimeout
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over the {limit:,}-byte limit")


class BodyTimeout(Exception):
    pass


async def json_body(request: Request):
    try:
        raw = await request.body()
    except BodyTooLarge as exc:  # a chunked body: the size shows only while reading it
        raise APIError(413, str(exc)) from None
    except BodyTimeout:
        raise APIError(408, f"the request body did not arrive within {BODY_SECONDS:.0f} s") from None
    return await run_in_threadpool(_loads, raw)  # off the event loop: a body of --max-body takes a while


def _loads(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, integers of thousands of digits, nesting too deep
        raise APIError(400, "the request body is not valid JSON (or nests or numbers beyond the limits)") from None

