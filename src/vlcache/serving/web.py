"""The chat page at `/`, and what keeps the page and the API to their own origin.

- `GET /` is the page; `/web/...` its script modules, style sheet and the vendored Markdown renderer and
  sanitizer. They are package data (vlcache/web/): nothing is fetched from elsewhere, nothing is built at install
  time. `--no-web` leaves both out (404).
- Every response says: run only this server's own script files (no inline script, no eval, nothing from another
  origin), connect only here, no framing, no sniffing, no referrer (`HEADERS`).
- Only requests that name this server in their `Host` header are answered (`HostCheck`, before anything
  else): a page on another name that its DNS re-points at this machine (DNS rebinding) sends its own name
  there, so it can neither read answers nor make its `Origin` look like the server's own.
- Browsers may change things from this origin only: a POST or DELETE whose Origin is another site's is refused
  (403), so no other page can spend the model, fill the cache or upload states on its visitors' behalf. With
  `--cors-origin`, that one other origin may, and gets CORS headers; no other does.
"""

from __future__ import annotations

import socket
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.staticfiles import StaticFiles

from .requests import error_response

WEB = Path(str(resources.files("vlcache") / "web"))  # a folder on disk: vlcache is installed unzipped

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",  # the page's own files: no inline script, no eval, no other origin
    "style-src 'self'",
    "img-src 'self' data: blob:",  # thumbnails of picked files; a model's Markdown image from elsewhere stays blank
    "media-src 'self' data: blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def add_web_page(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/web/`."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/web", StaticFiles(directory=WEB), name="web")
    del page  # registered on the app


def add_origin_policy(app: FastAPI, cors_origin: str | None) -> None:
    """The headers above on every response, cross-origin changes refused, and CORS for `cors_origin` alone."""
    if cors_origin is not None:
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Content-Type", "Authorization", "Accept"], max_age=600)
    app.add_middleware(OriginPolicy, cors_origin=cors_origin)  # added last: outermost, so CORS answers carry the headers


class OriginPolicy:
    """ASGI middleware: security headers on every response; POST and DELETE from another site's page refused."""

    def __init__(self, app, cors_origin: str | None = None):
        self.app, self.cors_origin = app, cors_origin

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        if scope["method"] not in SAFE_METHODS and origin is not None and not self._allowed(origin.decode("latin-1"), scope, headers):
            response = error_response(403, "requests from another site's page are refused (the server's own page, and "
                                           "the origin named by --cors-origin, may call it)")
            return await response(scope, receive, self._with_headers(send, scope))
        await self.app(scope, receive, self._with_headers(send, scope))

    def _allowed(self, origin: str, scope, headers: dict) -> bool:
        host = headers.get(b"host", b"").decode("latin-1")
        return origin == f"{scope.get('scheme', 'http')}://{host}" or origin == self.cors_origin

    @staticmethod
    def _with_headers(send, scope):
        page = scope.get("path") == "/" or scope.get("path", "").startswith("/web/")

        async def sending(message):
            if message["type"] == "http.response.start":
                extra = HEADERS + ([(b"cache-control", b"no-cache")] if page else [])  # a new version shows on reload
                message = {**message, "headers": list(message.get("headers") or []) + extra}
            await send(message)

        return sending


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::", "[::]")


def server_names(host: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """The names a request's Host may give: loopback, the address listened on, and --allowed-host's. Listening
    on every address (0.0.0.0), the machine's own host names and their addresses too; "*" turns the check off."""
    names = [*LOOPBACK_NAMES, *allowed]
    if host in WILDCARD_ADDRESSES:
        own = {socket.gethostname(), socket.getfqdn()}
        for name in list(own):
            try:
                own.update(info[4][0] for info in socket.getaddrinfo(name, None))
            except OSError:
                pass
        names += sorted(own)
    else:
        names.append(host)
    return [f"[{name}]" if ":" in name and not name.startswith("[") else name for name in names if name]


class HostCheck(TrustedHostMiddleware):
    """Starlette's TrustedHostMiddleware (it decides), answering a refusal with OpenAI's error JSON."""

    def __init__(self, app, names: list[str]):
        super().__init__(_Passed(app), allowed_hosts=names, www_redirect=False)
        self.state = getattr(app, "state", None)  # tests reach the service through app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        refused = False

        async def sending(message):
            nonlocal refused
            if message["type"] == "http.response.start" and not scope.get(_PASSED):  # the middleware's own refusal
                refused = True
                response = error_response(400, "the request's Host header names none of this server's names "
                                               "(loopback, --host, --allowed-host)")
                return await response(scope, receive, send)
            if not refused:
                await send(message)

        await super().__call__(scope, receive, sending)


_PASSED = "vlcache.host_checked"


class _Passed:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        scope[_PASSED] = True
        await self.app(scope, receive, send)
