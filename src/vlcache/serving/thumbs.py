"""Small previews of the images behind the listed states, for the web page's state list: one JPEG per image, by
the sha256 of its encoded bytes (what a state file's part records). Made, off the model thread, only for states
that are listed (made through /v1/vlcache/cache or /v1/images, or any without a cache_salt with
--share-all-states): a chat completion's photo is another client's. Kept in memory (bounded) and, when the
states folder is local, in its thumbs/ subfolder, so a restart keeps them. A thumbnail is a convenience: an
image it cannot be made of simply has none."""

from __future__ import annotations

import io
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("vlcache")

EDGE = 160  # pixels of the longer side
MAX_KEPT = 1024  # thumbnails held in memory (a few KB each)
_DIGEST = re.compile(r"[0-9a-f]{64}")


class Thumbnails:
    def __init__(self, folder: Path | None):
        self.folder = folder  # None: memory only (the states live in an object store)
        self._kept: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, kind: str, digest: str, data: bytes, max_pixels: int) -> None:
        """Make and keep the thumbnail of an image's bytes, unless it is known (videos have none)."""
        if kind != "image" or self.get(digest) is not None:
            return
        from ..errors import ImageError
        from ..images import load_image

        try:
            image = load_image(data, max_pixels).image.copy()
            image.thumbnail((EDGE, EDGE))
            out = io.BytesIO()
            image.convert("RGB").save(out, "JPEG", quality=75)
        except (ImageError, OSError, ValueError):
            return
        self._keep(digest, out.getvalue())
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = self.folder / f".{digest}.tmp"
                tmp.write_bytes(out.getvalue())
                tmp.replace(self.folder / f"{digest}.jpg")
            except OSError as exc:  # a read-only or full disk: the page shows the state without its picture
                log.info(f"could not keep a thumbnail in {self.folder}: {exc.strerror or exc}")

    def get(self, digest: str) -> bytes | None:
        if not _DIGEST.fullmatch(digest):
            return None
        with self._lock:
            if digest in self._kept:
                self._kept.move_to_end(digest)
                return self._kept[digest]
        if self.folder is None:
            return None
        try:
            data = (self.folder / f"{digest}.jpg").read_bytes()
        except OSError:
            return None
        self._keep(digest, data)
        return data

    def _keep(self, digest: str, data: bytes) -> None:
        with self._lock:
            self._kept[digest] = data
            while len(self._kept) > MAX_KEPT:
                self._kept.popitem(last=False)
