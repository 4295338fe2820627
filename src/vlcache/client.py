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
import glob
import hashlib
import http.client
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .answer import Answer, Delta
from . import paths
from .errors import CacheFileError, ModelMismatchError, VlcacheError
from .header import read_metadata

ENV = "VLCACHE_SERVER"
TIMEOUT = 600.0  # seconds for one call: a long answer, or an upload, on a slow machine
MAX_JSON_BYTES = 64 * 1024 * 1024  # the most a JSON reply or one answer's event stream may be
MAX_STATE_BYTES = 64 * 1024**3  # the most a downloaded state file may be
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
            health = self._json("GET", "/health")
            if not isinstance(health.get("fingerprint"), str) or not isinstance(health.get("model"), str):
                raise ServerError(f"{self.url} is not a vlcache server (its /health says otherwise); {_NO_SERVER_HINT}")
            self._health = health
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
        reply = self._json("POST", "/v1/vlcache/cache", json.dumps({"parts": parts, "system_prompt": system_prompt}).encode())
        return self._fields(reply, "/v1/vlcache/cache", id=str, tokens=int, image_tokens=int)

    def download(self, key: str, output: str | os.PathLike, sources: list[str] | None = None) -> Path:
        """Write the server's state file to `output`, atomically (a temporary file beside it, then a rename), and
        only a whole cache file of the server's model: the length the server declared, at most MAX_STATE_BYTES,
        within the call's time, its header checked (format, size, fingerprint) before it replaces anything.
        `sources`: the local files the state was made from, recorded as its parts' paths (the server saw bytes)."""
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        try:
            deadline = time.monotonic() + self.timeout
            with os.fdopen(fd, "wb") as fh, self._open("GET", f"/v1/vlcache/states/{key}") as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and (not declared.isdigit() or int(declared) > MAX_STATE_BYTES):
                    raise ServerError(f"the server at {self.url} offered a state file of {declared} bytes (the most "
                                      f"taken is {MAX_STATE_BYTES:,})")
                size = 0
                try:
                    while chunk := response.read(1 << 20):
                        size += len(chunk)
                        if size > MAX_STATE_BYTES or time.monotonic() > deadline:
                            raise ServerError(f"the server at {self.url} sent a state file over {MAX_STATE_BYTES:,} bytes "
                                              f"or for over {self.timeout:.0f} s; nothing was written")
                        fh.write(chunk)
                except http.client.IncompleteRead as exc:  # the connection ended before the declared length
                    size += len(exc.partial)
                except (OSError, http.client.HTTPException) as exc:
                    raise ServerError(f"the download from {self.url} failed ({exc}); nothing was written") from None
            if declared is not None and size != int(declared):
                raise ServerError(f"the server at {self.url} sent {size:,} of the {int(declared):,} bytes of the state file "
                                  "(the connection was cut); nothing was written")
            self._check_downloaded(tmp)
            if sources:
                tmp = _with_paths(tmp, sources)
                self._check_downloaded(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a cache file is as shareable as any other
            os.replace(tmp, output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return output

    def _check_downloaded(self, path: str) -> None:
        try:
            meta = read_metadata(path)  # the header checked: a vlcache file, its size what the header says
        except CacheFileError as exc:
            raise ServerError(f"the server at {self.url} sent a broken state file ({str(exc).replace(path, 'the download')}); "
                              "nothing was written") from None
        if meta.fingerprint != self.health()["fingerprint"]:
            raise ServerError(f"the server at {self.url} sent a state file of other model weights; nothing was written")

    # -- questions --------------------------------------------------------------------------------------------

    def stream(self, state: str | None, messages: list[dict], max_new_tokens: int, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None) -> Iterator[Delta]:
        """Deltas as the engine streams them (token ids are not sent: -1), the last with the Answer.
        `messages`: what follows the state (a question, or the turns of a chat), or a whole text-only chat."""
        body = {"state": state, "messages": messages, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "stream": True}
        deadline, received = time.monotonic() + self.timeout, 0
        with self._open("POST", "/v1/vlcache/ask", json.dumps(body).encode()) as response:
            while line := response.readline(MAX_JSON_BYTES + 1):
                received += len(line)
                if received > MAX_JSON_BYTES or time.monotonic() > deadline:  # an endless stream ends here
                    raise ServerError(f"the server at {self.url} sent over {MAX_JSON_BYTES:,} bytes or took over "
                                      f"{self.timeout:.0f} s for one answer")
                if not line.startswith(b"data: "):
                    continue
                try:
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise ServerError(f"the server at {self.url} failed: {str(event['error']['message']).splitlines()[0]}")
                    if "answer" in event:
                        yield Delta(text=str(event.get("text", "")), token_id=-1, answer=_answer(event["answer"]))
                        return
                    yield Delta(text=_text(event["text"]), token_id=-1)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise self._malformed("/v1/vlcache/ask", exc) from None
        raise ServerError(f"the server at {self.url} ended the answer early")

    def ask(self, state: str | None, messages: list[dict], max_new_tokens: int, temperature: float | None = None,
            top_p: float | None = None, seed: int | None = None) -> Answer:
        body = {"state": state, "messages": messages, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "stream": False}
        reply = self._json("POST", "/v1/vlcache/ask", json.dumps(body).encode())
        try:
            return _answer(reply["answer"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed("/v1/vlcache/ask", exc) from None

    # -- HTTP -------------------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body=None, content_type: str = "application/json", length: int | None = None):
        with self._open(method, path, body, content_type, length) as response:
            raw = response.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ServerError(f"{self.url} answered {path} with over {MAX_JSON_BYTES:,} bytes; is it a vlcache server?")
        try:
            reply = json.loads(raw)
        except (ValueError, RecursionError):
            raise ServerError(f"{self.url} answered {path} with something that is not JSON; is it a vlcache server?") from None
        if not isinstance(reply, dict):
            raise ServerError(f"{self.url} answered {path} with JSON that is not an object; is it a vlcache server?")
        return reply

    def _fields(self, reply: dict, path: str, **types) -> dict:
        """`reply` if its fields have the types named, else what the server sent wrong."""
        for name, kind in types.items():
            if not isinstance(reply.get(name), kind) or isinstance(reply.get(name), bool):
                raise self._malformed(path, TypeError(f"its {name!r} is not a {kind.__name__}"))
        return reply

    def _malformed(self, path: str, exc: BaseException) -> ServerError:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ServerError(f"the server at {self.url} sent a malformed reply to {path} ({what}); is it a vlcache server "
                           "of this version?")

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


def _answer(fields) -> Answer:
    """An Answer from the server's JSON, its fields' types checked (a malformed reply is an error, not a crash)."""
    if not isinstance(fields, dict):
        raise TypeError("the answer is not an object")
    answer = Answer(**fields)
    if not (isinstance(answer.text, str) and isinstance(answer.token_ids, list) and isinstance(answer.timings, dict)):
        raise TypeError("the answer's fields have the wrong types")
    return answer


def _text(value) -> str:
    if not isinstance(value, str):
        raise TypeError("an event's text is not a string")
    return value


def _with_paths(path: str, sources: list[str]) -> str:
    """The file at `path` rewritten (beside it; the original removed) with its parts' paths set to `sources`, in
    order, as a local `vlcache cache` records them: only the header's metadata changes, the tensors are copied as
    they are (safetensors' offsets count from the end of the header)."""
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
        fields = json.loads(header["__metadata__"]["metadata"])
        parts = fields.get("parts") or []
        if len(parts) != len(sources):
            return path  # not the state of these files: left as the server sent it
        for part, source in zip(parts, sources):
            part["path"] = str(Path(source).resolve())
        fields["image_path"] = parts[0]["path"] if parts else fields.get("image_path")
        header["__metadata__"]["metadata"] = json.dumps(fields)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the tensors' data stays 8-byte aligned
        fd, out = tempfile.mkstemp(prefix=Path(path).name.split(".tmp")[0] + ".", suffix=".tmp", dir=Path(path).parent)
        try:
            with os.fdopen(fd, "wb") as target:
                target.write(len(text).to_bytes(8, "little") + text)
                while chunk := fh.read(1 << 22):
                    target.write(chunk)
        except BaseException:
            Path(out).unlink(missing_ok=True)
            raise
    Path(path).unlink()
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files of downloads to `output` that were killed midway (an hour old: none is still writing)."""
    for tmp in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
        except OSError:
            pass


def _reason(exc: urllib.error.HTTPError) -> str:
    """The one-line message of an OpenAI-style error body, or the HTTP status."""
    try:
        message = json.loads(exc.read(MAX_JSON_BYTES))["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
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
    """--server, else $VLCACHE_SERVER, else None (run locally). `--server ""` runs locally whatever the
    environment says."""
    if given is not None:
        return given.strip() or None
    return os.environ.get(ENV) or None
