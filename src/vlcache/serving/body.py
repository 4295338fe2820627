"""Request bodies within bounds: a size limit (413) and a time limit (408) on every body, the longer time of
uploads on the paths that take files, and the JSON body the routes read."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request

from .requests import APIError, error_response

BODY_SECONDS = 60.0  # the whole request body must arrive within this (a slow-loris body is cut off: 408)
UPLOAD_SECONDS = 1800.0  # the same for an uploaded state file (gigabytes over a network)


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


async def json_body(request: Request):
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

