"""A thin client of a running `vlcache serve`: what `--server URL` (or $VLCACHE_SERVER) makes of the CLI and the
guide's scripts. Standard library only, and nothing here imports torch or transformers: a question costs an
HTTP round trip, not a model load.

A cache file reaches the server by identity, never by path: the client reads the file's header (the model it
belongs to, no tensors) and the sha256 of its bytes (remembered per file), and asks whether the server holds
that file; only if not is it uploaded (once; the server checks it as it checks any cache file, and keeps it
apart from the states it looks up by image, so a client's file can never answer another client's question). Answers come back as the engine's
own Answer, so the CLI prints them exactly as it prints local ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .answer import Answer, Delta
from . import paths
from .errors import ModelMismatchError, VlcacheError
from .header import read_metadata

ENV = "VLCACHE_SERVER"
TIMEOUT = 600.0  # seconds for one call: a long answer, or an upload, on a slow machine
_NO_SERVER_HINT = "start one with `vlcache serve --detach`, or drop --server (and unset VLCACHE_SERVER) to load the model here"


class ServerError(VlcacheError):
    """The server cannot be reached, or refused the request (its one-line reason)."""


class Client:
    def __init__(self, url: str, timeout: float = TIMEOUT):
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url = url.removesuffix("/v1")
        self.timeout = timeout
        self._health: dict | None = None

    # -- what the server is -----------------------------------------------------------------------------------

    def health(self) -> dict:
        """The server's /health: status, model, fingerprint, states held. ServerError if none answers."""
        if self._health is None:
            self._health = self._json("GET", "/health")
            if not isinstance(self._health, dict) or "fingerprint" not in self._health:
                raise ServerError(f"{self.url} is not a vlcache server (its /health says otherwise); {_NO_SERVER_HINT}")
        return self._health

    # -- states -----------------------------------------------------------------------------------------------

    def state_for(self, path: str | os.PathLike) -> str:
        """The server's id of the state in a cache file, uploading the file if the server does not hold it."""
        meta = read_metadata(path)
        health = self.health()
        if meta.fingerprint != health["fingerprint"]:
            raise ModelMismatchError(
                f"model mismatch: {path} was made with {meta.model} (weights {meta.fingerprint[:12]}), but the server "
                f"at {self.url} runs {health['model']} (weights {health['fingerprint'][:12]}); re-create the cache or "
                f"start a server with --model {meta.model}"
            )
        key = file_digest(path)
        try:
            self._json("GET", f"/v1/images/{key}")
            return key
        except ServerError as exc:
            if getattr(exc, "status", None) != 404:
                raise
        with open(path, "rb") as fh:
            reply = self._json("POST", "/v1/vlcache/states", fh, content_type="application/octet-stream",
                               length=Path(path).stat().st_size)
        if reply.get("id") != key:
            raise ServerError(f"{path} changed while it was uploaded; try again")
        return key

    def cache(self, sources: list[str], system_prompt: str | None) -> dict:
        """Compute a state on the server from image and video files; returns its id and sizes."""
        from .media import kind_of

        parts = [{"type": kind_of(s), "data": base64.b64encode(Path(s).read_bytes()).decode()} for s in sources]
        return self._json("POST", "/v1/vlcache/cache", json.dumps({"parts": parts, "system_prompt": system_prompt}).encode())

    def download(self, key: str, output: str | os.PathLike) -> Path:
        """Write the server's state file to `output`, atomically (a temporary file beside it, then a rename)."""
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        try:
            with os.fdopen(fd, "wb") as fh, self._open("GET", f"/v1/vlcache/states/{key}") as response:
                while chunk := response.read(1 << 20):
                    fh.write(chunk)
            os.replace(tmp, output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return output

    # -- questions --------------------------------------------------------------------------------------------

    def stream(self, state: str | None, messages: list[dict], max_new_tokens: int, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None) -> Iterator[Delta]:
        """Deltas as the engine streams them (token ids are not sent: -1), the last with the Answer.
        `messages`: what follows the state (a question, or the turns of a chat), or a whole text-only chat."""
        body = {"state": state, "messages": messages, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "stream": True}
        with self._open("POST", "/v1/vlcache/ask", json.dumps(body).encode()) as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise ServerError(f"the server at {self.url} failed: {event['error']['message']}")
                if "answer" in event:
                    yield Delta(text=event.get("text", ""), token_id=-1, answer=Answer(**event["answer"]))
                    return
                yield Delta(text=event["text"], token_id=-1)
        raise ServerError(f"the server at {self.url} ended the answer early")

    def ask(self, state: str | None, messages: list[dict], max_new_tokens: int, temperature: float | None = None,
            top_p: float | None = None, seed: int | None = None) -> Answer:
        body = {"state": state, "messages": messages, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "stream": False}
        return Answer(**self._json("POST", "/v1/vlcache/ask", json.dumps(body).encode())["answer"])

    # -- HTTP -------------------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body=None, content_type: str = "application/json", length: int | None = None):
        with self._open(method, path, body, content_type, length) as response:
            try:
                return json.loads(response.read())
            except ValueError:
                raise ServerError(f"{self.url} answered {path} with something that is not JSON; is it a vlcache server?") from None

    def _open(self, method: str, path: str, body=None, content_type: str = "application/json", length: int | None = None):
        headers = {"Content-Type": content_type} if body is not None else {}
        if length is not None:
            headers["Content-Length"] = str(length)
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 - the user's own server URL
        except urllib.error.HTTPError as exc:
            error = ServerError(_reason(exc))
            error.status = exc.code
            raise error from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach a vlcache server at {self.url} ({reason}); {_NO_SERVER_HINT}") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    """The one-line message of an OpenAI-style error body, or the HTTP status."""
    try:
        message = json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = f"HTTP {exc.code} {exc.reason}"
    return str(message).splitlines()[0] if message else f"HTTP {exc.code}"


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes: an uploaded cache file's id on the server. Remembered in
    $VLCACHE_HOME/file-hashes.json by path, size, inode and modification time, so a file is hashed once."""
    stat = os.stat(path)
    stamp = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}"
    book = paths.file_hashes_file()
    try:
        known = json.loads(book.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(stamp), str):
        return known[stamp]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    known = {k: v for k, v in known.items() if not k.startswith(os.path.abspath(path) + "|")}  # one entry a file
    known[stamp] = digest.hexdigest()
    try:
        book.parent.mkdir(parents=True, exist_ok=True)
        tmp = book.with_name(f".{book.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, book)
    except OSError:
        pass  # remembering is an optimisation
    return known[stamp]


def server_url(given: str | None) -> str | None:
    """--server, else $VLCACHE_SERVER, else None (run locally)."""
    return given or os.environ.get(ENV) or None
