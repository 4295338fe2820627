"""Media bytes a request names: data: URLs, and where the server allows them, http(s) URLs (public hosts only,
bounded in size, time and concurrency) and files under one folder."""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from .options import ServeOptions
from .requests import APIError

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
