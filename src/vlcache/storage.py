"""Where cache files live: local paths, or fsspec URLs (`s3://bucket/prefix/x.pt`, `gs://...`, `file://...`,
`memory://...`), with credentials and endpoints from the usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
...). The rest of vlcache reads and writes through these few functions.

- Reads: a file's first bytes alone (the header is validated before any tensor is fetched), or all of it.
- Writes are atomic: a local file is written beside the target and renamed; an object store's PUT makes an
  object appear whole or not at all.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import CacheFileError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | os.PathLike) -> bool:
    return bool(_SCHEME.match(str(location)))


def join(folder: str | os.PathLike, name: str) -> str | Path:
    return f"{str(folder).rstrip('/')}/{name}" if is_url(folder) else Path(folder) / name


def _fs(url: str):
    try:
        import fsspec
    except ImportError:  # a dependency of huggingface_hub; only a broken install lacks it
        raise CacheFileError("URLs need fsspec: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = str(url).split("://")[0]
        hint = " (pip install 'vlcache[s3]' for s3://)" if scheme in ("s3", "s3a") else ""
        raise CacheFileError(f"cannot open {url}: {str(exc).splitlines()[0]}{hint}") from None


def _failed(url, exc: BaseException) -> CacheFileError:
    if isinstance(exc, FileNotFoundError):
        return CacheFileError(f"cache file not found: {url}")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CacheFileError(f"cannot read {url}: {getattr(exc, 'strerror', None) or text}")


def size(url: str) -> int:
    fs, path = _fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise CacheFileError(f"cache file not found: {url}") from None
    except OSError as exc:
        raise _failed(url, exc) from None
    if info.get("type") == "directory":
        raise CacheFileError(f"cache path is a folder, not a file: {url}")
    return int(info.get("size") or 0)


def read_range(url: str, start: int, end: int) -> bytes:
    fs, path = _fs(url)
    try:
        return fs.cat_file(path, start=start, end=end)
    except (OSError, ValueError) as exc:
        raise _failed(url, exc) from None


def read_bytes(url: str) -> bytes:
    fs, path = _fs(url)
    try:
        return fs.cat_file(path)
    except (OSError, ValueError) as exc:
        raise _failed(url, exc) from None


def open_read(url: str, block: int = 1 << 20):
    """A file at a URL opened for reading in pieces: an object store's reads are ranged requests of `block`
    bytes, so reading it through holds one piece at a time, never the whole object. FileNotFoundError if gone."""
    fs, path = _fs(url)
    return fs.open(path, "rb", block_size=block)


def write_atomic(url: str, data: bytes) -> None:
    """The object appears whole or not at all (local: temporary file and rename; object stores: one PUT)."""
    fs, path = _fs(url)
    if "file" in _protocols(fs):
        local = Path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a cache file is as shareable as any other
            os.replace(tmp, local)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs.pipe_file(path, data)


def umask() -> int:
    """The process's umask (read by setting it, so set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def put_file(local: str, url: str) -> None:
    """Copy a local file to a URL, streamed (an object store's upload appears whole or not at all)."""
    fs, path = _fs(url)
    fs.put_file(local, path)


def exists(url: str) -> bool:
    fs, path = _fs(url)
    try:
        return fs.exists(path)
    except OSError:
        return False


def delete(url: str) -> bool:
    fs, path = _fs(url)
    try:
        fs.rm_file(path)
        return True
    except (FileNotFoundError, OSError):
        return False


def listing(folder: str, suffixes: tuple[str, ...]) -> dict[str, tuple[float, int]]:
    """The files directly in a folder URL whose names end in `suffixes`: URL -> (modification stamp, size)."""
    fs, path = _fs(folder)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise _failed(folder, exc) from None
    scheme = folder.split("://")[0]
    out = {}
    for entry in entries:
        name = entry["name"]
        if entry.get("type") != "file" or not name.endswith(suffixes):
            continue
        stamp = entry.get("LastModified") or entry.get("mtime") or entry.get("ETag") or 0
        stamp = stamp.timestamp() if hasattr(stamp, "timestamp") else stamp
        url = name if is_url(name) else f"{scheme}://{name.lstrip('/')}" if scheme != "file" else f"file://{name}"
        out[url] = (stamp, int(entry.get("size") or 0))
    return out


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


class Folder:
    """A folder of cache files, local or at an fsspec URL: what a server's --cache-dir is."""

    def __init__(self, location: str | os.PathLike):
        self.is_url = is_url(location)
        self.location = str(location).rstrip("/") + "/" if self.is_url else Path(location)

    def __str__(self) -> str:
        return str(self.location)

    def make(self) -> None:
        """Make the folder, and prove it can be written (a probe file written and removed): a server refuses
        at start a folder it could never store a state in, rather than failing every request later."""
        probe = self.file(f".vlcache-probe-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            if not self.is_url:  # object stores have no folders to make
                self.location.mkdir(parents=True, exist_ok=True)
                Path(probe).write_bytes(b"")
                Path(probe).unlink()
            else:
                write_atomic(probe, b"")
                delete(probe)
        except CacheFileError as exc:
            raise CacheFileError(f"cannot use the cache folder {self.location}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any filesystem's refusal (read-only, http://, no space)
            reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            raise CacheFileError(f"cannot write to the cache folder {self.location}: {reason}") from None

    def file(self, name: str) -> Path | str:
        return self.location + name if self.is_url else self.location / name

    def exists(self, file: Path | str) -> bool:
        return exists(file) if self.is_url else Path(file).exists()

    def delete(self, file: Path | str) -> bool:
        if self.is_url:
            return delete(file)
        try:
            Path(file).unlink()
            return True
        except FileNotFoundError:
            return False

    def entries(self, suffixes: tuple[str, ...], sub: str | None = None) -> dict:
        """The cache files directly in the folder (or its subfolder `sub`): file -> (modification stamp, size)."""
        if self.is_url:
            return listing(self.location + (sub + "/" if sub else ""), suffixes)
        out = {}
        try:
            paths = list((self.location / sub if sub else self.location).iterdir())
        except OSError:
            return {}
        for path in paths:
            if path.suffix not in suffixes:
                continue
            try:
                info = path.stat()
            except OSError:
                continue
            if path.is_file():
                out[path] = (info.st_mtime, info.st_size)
        return out
