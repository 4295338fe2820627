"""Two tiers of image states for the server: hot in memory under a byte budget (LRU), all of them on disk.

States are keyed by what decides their tokens and KV: model fingerprint, image content hash, the template
text before the image (the system prompt) and the processor settings. On disk each lives under its key,
in the same file format as `vlcache cache`, so a restarted server, or a second one sharing the folder, finds
it; a file made by `vlcache cache` and dropped into the folder is found by its metadata.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CacheFileError
from .. import storage
from ..header import Layout
from ..storage import Folder
from ..header import media_identity, metadata_key, state_key  # noqa: F401 - keys are part of the store's interface
from ..state import ImageState, StateMetadata, load_state, read_metadata

KEY_PATTERN = re.compile(r"[0-9a-f]{64}")  # use fullmatch: "$" would also accept a trailing newline
RESCAN_SECONDS = 1.0  # a miss looks for files others added at most this often
STAMP_SETTLED_NS = 2 * 10**9  # a folder changed more recently than this is scanned whatever its stamp says
UPLOADS = "uploads"  # the subfolder of uploaded cache files, by content hash
DOWNLOAD_PIECE = 1 << 20  # bytes a download reads (an object store: one ranged request) and sends at a time
SHARED = "shared"  # the subfolder of markers (<key>.shared, empty) of states made through a sharing endpoint
log = logging.getLogger("vlcache")


@dataclass
class Download:
    """A state's bytes being sent: `pieces` yields them, `close` frees the file (call it whatever happens)."""

    pieces: Iterator[bytes]
    close: Callable[[], None]
    size: int | None  # None: not known before the end (a state serialized from memory)


@dataclass(frozen=True)
class StoredState:
    """A state as the listing shows it."""

    key: str
    metadata: StateMetadata
    bytes: int  # its file's size (its K/V's size when held in memory only)
    last_used: float  # unix seconds: served or stored by this process, or its file last written
    in_memory: bool


@dataclass
class Continuation:
    """A conversation after its image state, as the record of its token ids: its K/V are blocks the scheduler's
    prefix tree keeps (decode.radix), one copy for every conversation that shares them, under the K/V bound
    (--kv-memory) and evicted least recently used first; `node` (its last block's) says whether they still are."""

    input_ids: torch.Tensor  # [1, n]: the base's ids, then the turn's new ids and answer
    node: object  # decode.radix.Node
    answer_start: int = 0  # tokens before the kept answer (its assistant header included)
    key: str = ""  # set when kept

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def alive(self) -> bool:
        return bool(getattr(self.node, "alive", False))


class StateStore:
    def __init__(self, cache_dir: str | Path, memory_budget: int, fingerprint: str, device, adopt=None,
                 layout: Layout | None = None, upload_quota: int | None = None, share_all: bool = False,
                 disk_quota: int | None = None):
        self.folder = Folder(cache_dir)  # a local folder or an fsspec URL (s3://bucket/prefix/): shared by a fleet
        self.folder.make()  # CacheFileError for a folder that cannot be written: refused at start
        self.budget = memory_budget
        self.fingerprint = fingerprint
        self.device = device
        self._adopt = adopt or (lambda state: state)  # e.g. Engine.adopt: states of another dtype are cast
        self.layout = layout  # the model's: files whose tensors do not fit it are misses, read no further than the header
        self.upload_quota = upload_quota  # bytes of uploaded files kept; the least recently used go beyond it
        self.disk_quota = disk_quota  # bytes of the files of computed states kept; the least recently used go beyond it
        self._hot: OrderedDict[str, ImageState] = OrderedDict()
        self._hot_bytes = 0
        self._index: dict[str, Path | str] = {}  # key -> file, for files not named by their key
        self._scanned: dict[Path | str, tuple[float, int]] = {}  # file -> (mtime, size) when its header was read
        self._last_scan = 0.0
        self._stamp: tuple | None = None  # _folder_stamp() when the index was last brought up to date
        self._meta: dict[Path | str, StateMetadata] = {}  # file -> its metadata, read by the scan that indexed it
        self._used: dict[str, float] = {}  # key -> when this process last served or stored it (time.time())
        self.write_errors = 0  # states that could not be written to disk (kept in memory only)
        # Conversations that went on after an image state (records of ids; their K/V are in the scheduler's
        # prefix tree): image key -> continuations.
        self._continuations: dict[str, list[Continuation]] = {}
        # States that may be listed and named by id: those made through /v1/images and /v1/vlcache/cache (a
        # marker file each, so a restarted server or another one sharing the folder agrees), or all with share_all.
        # A chat completion's state is another client's conversation and photo: it is found only by its contents.
        self.share_all = share_all
        self._shared: set[str] = set()
        self._lock = threading.RLock()
        self.forget: Callable[[str], None] | None = None  # called with a deleted state's key (the server: its tree)
        remove_stale_uploads(self.upload_folder())
        self.rescan()

    # -- lookups ---------------------------------------------------------------------------------------------

    def get(self, key: str) -> tuple[ImageState | None, str]:
        """The state and where it came from: "memory", "disk", or (None, "miss")."""
        with self._lock:
            if key in self._hot:
                self._hot.move_to_end(key)
                self._used[key] = time.time()
                return self._hot[key], "memory"
        path = self.path_for(key)
        if path is None:
            return None, "miss"
        try:
            state = self._adopt(load_state(path, device=self.device, layout=self.layout))
        except CacheFileError:
            return None, "miss"
        if not self.folder.is_url:
            with contextlib.suppress(OSError):
                os.utime(path)  # used: the disk quota removes the least recently used files first
        self._keep_hot(key, state)
        with self._lock:
            self._used[key] = time.time()
        return state, "disk"

    def put(self, key: str, state: ImageState) -> None:
        """Keep a computed state in memory and write it to the folder; a failed write (disk full, read-only
        folder) is logged and counted, and the state is still served from memory."""
        target = self.folder.file(f"{key}.safetensors")
        try:
            if not self.folder.exists(target):
                state.save(target)
            with self._lock:
                self._index[key] = target
            if not self.folder.is_url:  # listed at once, with its size, not after the next scan
                info = os.stat(target)
                with self._lock:
                    self._meta[target], self._scanned[target] = state.metadata, (info.st_mtime, info.st_size)
            self._hold_disk_quota(keep=target)
        except Exception as exc:  # noqa: BLE001 - disk full, read-only, any object store's error: the answer goes on
            self.write_errors += 1
            log.warning(f"warning: could not write state {key[:12]} to {self.folder}: {_reason(exc)}; serving it from memory")
        self._keep_hot(key, state)
        with self._lock:
            self._used[key] = time.time()

    # -- uploads: cache files clients sent (--server), kept apart ----------------------------------------------
    # An upload is known by the hash of its bytes, and lives in uploads/ (which rescans never index): its
    # metadata is the sender's word, so it must never answer a request that found a state by what it is about
    # (another client's image), only requests that name the exact file.

    def upload_folder(self) -> Path:
        """Where uploads are received before they are checked: beside the states when they are local (then
        renamed into place), else the temporary folder."""
        return Path(self.folder.location) if not self.folder.is_url else Path(tempfile.gettempdir())

    def add_upload(self, digest: str, received: Path) -> None:
        """Keep a received and checked upload under its digest (moved from `received`), then hold the uploads
        to the quota. Nothing is loaded: the state is read when a request names it."""
        target = self.folder.file(f"{UPLOADS}/{digest}.safetensors")
        if not self.folder.exists(target):
            if self.folder.is_url:
                storage.put_file(str(received), str(target))
            else:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                os.chmod(received, 0o666 & ~storage.umask())
                os.replace(received, target)
        elif not self.folder.is_url:
            os.utime(target)  # sent again: recently used
        self._hold_upload_quota(keep=target)

    def _hold_upload_quota(self, keep) -> None:
        if self.upload_quota is None:
            return
        entries = self.folder.entries((".safetensors",), sub=UPLOADS)
        total = sum(size for _, size in entries.values())
        for path, (_, size) in sorted(entries.items(), key=lambda item: item[1][0]):  # least recently used first
            if total <= self.upload_quota:
                break
            if str(path) == str(keep):
                continue
            if self.folder.delete(path):
                total -= size
                with self._lock:
                    self._evict(UPLOADS + ":" + Path(str(path)).stem)
                log.info(f"upload {Path(str(path)).stem[:12]} removed: uploads over their {self.upload_quota:,}-byte quota")

    def _hold_disk_quota(self, keep) -> None:
        """Remove the least recently used (written or read) files of computed states beyond the disk quota, all
        but `keep`, the newest. Only files named by their key (what this server writes) count and go: a cache file
        someone put in the folder under another name is theirs to remove."""
        if self.disk_quota is None:
            return
        entries = {path: stamp for path, stamp in self.folder.entries((".safetensors",)).items()
                   if KEY_PATTERN.fullmatch(Path(str(path)).name.split(".")[0])}
        total = sum(size for _, size in entries.values())
        for path, (_, size) in sorted(entries.items(), key=lambda item: item[1][0]):  # least recently used first
            if total <= self.disk_quota:
                break
            if str(path) == str(keep):
                continue
            key = Path(str(path)).name.split(".")[0]
            if self.folder.delete(path):
                total -= size
                with self._lock:  # held in memory, it is still served (and sent) from there, shared as it was
                    self._index.pop(key, None)
                    gone = key not in self._hot
                    if gone:
                        self._shared.discard(key)
                if gone:
                    self.folder.delete(self._marker(key))
                log.info(f"state {key[:12]} removed: states over their {self.disk_quota:,}-byte disk quota")

    def get_upload(self, digest: str) -> tuple[ImageState | None, str]:
        key = UPLOADS + ":" + digest
        with self._lock:
            if key in self._hot:
                self._hot.move_to_end(key)
                return self._hot[key], "memory"
        path = self.folder.file(f"{UPLOADS}/{digest}.safetensors")
        if not self.folder.exists(path):
            return None, "miss"
        try:
            state = self._adopt(load_state(path, device=self.device, layout=self.layout))
        except CacheFileError:
            return None, "miss"
        if not self.folder.is_url:
            with contextlib.suppress(OSError):
                os.utime(path)  # used: the quota removes the least recently used uploads first
        self._keep_hot(key, state)
        return state, "disk"

    def open_download(self, key: str) -> "Download | None":
        """A state's cache file opened once for sending (a delete or a rescan afterwards does not cut it short),
        or, held in memory only (its file could not be written: disk full), its state serialized piece by piece;
        None if neither is here. Either way a download holds one piece in memory at a time, never the file."""
        path = self.path_for(key)
        if path is not None:
            try:
                handle = storage.open_read(str(path), DOWNLOAD_PIECE) if self.folder.is_url else open(path, "rb")
            except (OSError, CacheFileError):  # deleted since: answered from memory, or a 404
                handle = None
            if handle is not None:
                size = handle.size if self.folder.is_url else os.fstat(handle.fileno()).st_size
                return Download(iter(functools.partial(handle.read, DOWNLOAD_PIECE), b""), handle.close, size)
        with self._lock:
            state = self._hot.get(key)
        if not isinstance(state, ImageState):
            return None
        return Download(state.pieces(DOWNLOAD_PIECE), lambda: None, None)

    def add_continuation(self, image_key: str, state: Continuation) -> None:
        """Record what followed an image state (its blocks are in the prefix tree): a next turn starts from it."""
        state.key = f"{image_key}:{uuid.uuid4().hex}"
        with self._lock:
            kept = [known for known in self._continuations.get(image_key, []) if known.alive]
            # Identical conversations are kept once (the tree holds their blocks once either way).
            if not any(torch.equal(known.input_ids, state.input_ids.to(known.input_ids.device)) for known in kept):
                kept.append(state)
            self._continuations[image_key] = kept

    def best_continuation(self, image_key: str, ids: torch.Tensor) -> tuple[Continuation | None, int]:
        """The kept continuation (its blocks still in the tree) sharing the longest run of leading tokens with
        `ids` [1, n], and that length."""
        best: tuple[Continuation | None, int] = (None, 0)
        with self._lock:
            kept = [known for known in self._continuations.get(image_key, []) if known.alive]
            if kept:
                self._continuations[image_key] = kept
            else:
                self._continuations.pop(image_key, None)
            for state in kept:
                n = min(state.num_tokens, ids.shape[1])
                same = int((state.input_ids[0, :n].to(ids.device) == ids[0, :n]).long().cumprod(0).sum())
                if same > best[1]:
                    best = (state, same)
        return best

    def share(self, key: str) -> None:
        """Mark a state as made through a sharing endpoint: listed, and answered by id (a marker beside it)."""
        with self._lock:
            if key in self._shared:
                return
            self._shared.add(key)
        marker = self._marker(key)
        try:
            if self.folder.is_url:
                storage.write_atomic(str(marker), b"")
            else:
                Path(marker).parent.mkdir(parents=True, exist_ok=True)
                Path(marker).touch()
        except Exception as exc:  # noqa: BLE001 - disk full, an object store's error: shared in this process still
            log.warning(f"warning: could not mark state {key[:12]} as shared in {self.folder}: {_reason(exc)}")

    def visible(self, key: str) -> bool:
        """Whether a client may name this state by id (read its metadata or file, ask about it, delete it)."""
        if self.share_all:
            return True
        with self._lock:
            if key in self._shared:
                return True
        if self.folder.exists(self._marker(key)):  # shared by another server on the same folder
            with self._lock:
                self._shared.add(key)
            return True
        return False

    def is_upload(self, digest: str) -> bool:
        with self._lock:
            if UPLOADS + ":" + digest in self._hot:
                return True
        return self.folder.exists(self.folder.file(f"{UPLOADS}/{digest}.safetensors"))

    def _marker(self, key: str) -> Path | str:
        return self.folder.file(f"{SHARED}/{key}.shared")

    def delete(self, key: str) -> bool:
        with self._lock:
            found = key in self._hot
            self._evict(key)
            self._continuations.pop(key, None)
        if self.forget is not None:
            self.forget(key)  # the conversations the prefix tree keeps under it
        with self._lock:
            self._shared.discard(key)
            path = self._index.pop(key, None) or self.folder.file(f"{key}.safetensors")
        self.folder.delete(self._marker(key))
        return self.folder.delete(path) or found

    def metadata(self, key: str) -> StateMetadata | None:
        """A state's metadata by key, or an upload's by its content hash (None if neither is here)."""
        with self._lock:
            for name in (key, UPLOADS + ":" + key):
                if name in self._hot:
                    return self._hot[name].metadata
        path = self.path_for(key)
        upload = self.folder.file(f"{UPLOADS}/{key}.safetensors")
        path = path or (upload if self.folder.exists(upload) else None)
        try:
            return read_metadata(path) if path else None
        except CacheFileError:
            return None

    @property
    def hot_bytes(self) -> int:
        return self._hot_bytes

    @property
    def hot_count(self) -> int:
        """States in memory (continuations of conversations not counted)."""
        return sum(1 for key in self._hot if ":" not in key or key.startswith(UPLOADS + ":"))

    def listing(self) -> list[StoredState]:
        """The states a client may ask about by id, newest first: those made through a sharing endpoint (all of
        the folder's with share_all), from the folder's cache files and the states held in memory only (their
        write failed). Uploads are left out (they answer only whoever has their file), and so are states made for
        a cache_salt: their file is named by a key their metadata cannot give, and listing them would hand one
        tenant's states to everyone. The folder is looked at again at most every RESCAN_SECONDS."""
        with self._lock:
            due = time.monotonic() - self._last_scan >= RESCAN_SECONDS
        if due:
            self.rescan()
        with self._lock:
            out = {}
            for key, path in self._index.items():  # states of a cache_salt are not indexed (rescan)
                if path not in self._meta:
                    continue
                mtime, size = self._scanned.get(path, (0.0, 0))
                out[key] = StoredState(key, self._meta[path], size, max(mtime, self._used.get(key, 0.0)), key in self._hot)
            for key, state in self._hot.items():
                if key in out or ":" in key or not isinstance(state, ImageState) or metadata_key(state.metadata) != key:
                    continue
                out[key] = StoredState(key, state.metadata, state.kv_bytes, self._used.get(key, 0.0), True)
            if not self.share_all:
                out = {key: state for key, state in out.items() if key in self._shared}
        return sorted(out.values(), key=lambda s: (s.metadata.created, s.key), reverse=True)

    # -- internals -------------------------------------------------------------------------------------------

    def rescan(self) -> None:
        """Index the folder's cache files by the key their metadata gives (files of other models are ignored).

        Incremental: only files that are new or changed since the last scan have their header read, and a
        broken file is skipped (and not read again until it changes).
        """
        with self._lock:
            self._last_scan = time.monotonic()
        stamp = self._folder_stamp()
        if stamp is not None and stamp == self._stamp:
            return  # no file added, removed or renamed since the last scan: the index is up to date
        try:
            seen = self.folder.entries((".safetensors", ".pt"))
            shared = {Path(str(path)).stem for path in self.folder.entries((".shared",), sub=SHARED)}
        except CacheFileError as exc:
            log.warning(f"warning: cannot list {self.folder}: {exc}")
            return
        found = {path: self._key_of(path) for path, stamp in seen.items() if self._scanned.get(path) != stamp}
        with self._lock:
            gone = [key for key, path in self._index.items() if path not in seen or path in found]
            for key in gone:
                del self._index[key]
            for path, key in found.items():
                if key is not None and not _named_for_another_key(path, key):
                    self._index[key] = path
            self._scanned = seen
            self._shared |= {key for key in shared if KEY_PATTERN.fullmatch(key)}
            self._meta = {path: meta for path, meta in self._meta.items() if path in seen}
            self._stamp = stamp

    def _folder_stamp(self) -> tuple | None:
        """When the local folder and its markers' folder last had a file added, removed or renamed (states are
        written by a rename), or None: not known, or too recent to rely on (a change within the clock's tick of
        the last scan would look like none), or an object store. A listing then skips the scan of every file."""
        if self.folder.is_url:
            return None
        try:
            stamps = [os.stat(folder).st_mtime_ns for folder in (self.folder.location, self.folder.location / SHARED)
                      if os.path.isdir(folder)]
        except OSError:
            return None
        if not stamps or time.time_ns() - max(stamps) < STAMP_SETTLED_NS:
            return None
        return tuple(stamps)

    def _key_of(self, path: Path | str) -> str | None:
        try:
            meta = read_metadata(path)
        except CacheFileError:
            return None
        if meta.fingerprint != self.fingerprint:
            return None
        with self._lock:
            self._meta[path] = meta
        return metadata_key(meta)

    def path_for(self, key: str) -> Path | str | None:
        """The file holding a state, if the folder has one (rescanned at most every RESCAN_SECONDS)."""
        named = self.folder.file(f"{key}.safetensors")
        if self.folder.exists(named):
            return named
        with self._lock:
            path = self._index.get(key)
            due = time.monotonic() - self._last_scan >= RESCAN_SECONDS
        if (path is None or not self.folder.exists(path)) and due:
            self.rescan()  # another server, or a user, may have added files since
            with self._lock:
                path = self._index.get(key)
        return path if path is not None and self.folder.exists(path) else None

    def _keep_hot(self, key: str, state) -> None:
        with self._lock:
            if key in self._hot:
                self._hot.move_to_end(key)
                return
            if state.kv_bytes > self.budget:  # larger than the whole budget: serve it, keep nothing else out for it
                return
            self._hot[key] = state
            self._hot_bytes += state.kv_bytes
            while self._hot_bytes > self.budget and len(self._hot) > 1:
                self._evict(next(iter(self._hot)))

    def _evict(self, key: str) -> None:
        # Its continuations stay: their blocks are the prefix tree's (under --kv-memory), not this budget's.
        if key in self._hot:
            self._hot_bytes -= self._hot.pop(key).kv_bytes


def _named_for_another_key(path: Path | str, key: str) -> bool:
    """A file named by a key that its metadata does not give: a state made for a cache_salt (the salt is part of
    its key, not of its metadata). It is found by that name alone, never under the key its metadata gives, or
    a request without the salt would be answered from another tenant's state."""
    stem = Path(str(path)).name.split(".")[0]
    return KEY_PATTERN.fullmatch(stem) is not None and stem != key


STALE_UPLOAD_SECONDS = 2 * 3600  # longer than any upload may take (body.UPLOAD_SECONDS): a server killed midway left it


def remove_stale_uploads(folder: Path) -> None:
    """Remove uploads left half-received by a server killed midway (old enough that no server is receiving them)."""
    now = time.time()
    for tmp in folder.glob(".upload-*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_UPLOAD_SECONDS:
                tmp.unlink()
                log.info(f"removed a stale upload: {tmp.name}")


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
