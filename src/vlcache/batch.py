"""Cache many images and videos with one model load, one state each: expand arguments, name outputs, skip
what is up to date."""

from __future__ import annotations

import glob
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .errors import CacheFileError, VlcacheError
from .media import MediaOptions, kind_of as media_kind
from .header import read_metadata
from .video import VIDEO_SUFFIXES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES  # what a folder argument contributes
CACHE_SUFFIX = "_cache.pt"
CACHE_SUFFIXES = (".pt", ".safetensors")  # what a folder of caches contributes


@dataclass
class CacheResult:
    image: str
    output: Path | None
    status: str  # "cached", "skipped" (up to date) or "failed"
    error: str | None = None
    tokens: int = 0
    seconds: float = 0.0


def expand_images(arguments: Sequence[str]) -> tuple[list[Path], list[CacheResult]]:
    """Files as given, folders as their image and video files (sorted, not recursive), globs as their matches.

    Returns the images and a failure for each argument that names nothing.
    """
    found: list[Path] = []
    missing: list[CacheResult] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES)
        elif path.exists():
            found.append(path)
        elif glob.has_magic(arg):
            matches = sorted(Path(p) for p in glob.glob(arg) if Path(p).is_file())
            found += matches
            if not matches:
                missing.append(CacheResult(arg, None, "failed", f"no files match {arg}"))
        else:
            missing.append(CacheResult(arg, None, "failed", f"image not found: {arg}"))
    unique, seen = [], set()
    for p in found:  # the same file named twice (a folder and a glob, say) is cached once
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique, missing


def expand_caches(arguments: Sequence[str]) -> list[Path | str]:
    """Cache files as given, folders as the .pt and .safetensors files in them (sorted); URLs too (a URL that
    ends in "/" is a folder)."""
    caches: list[Path | str] = []
    for arg in arguments:
        if storage.is_url(arg):
            found = sorted(storage.listing(arg, CACHE_SUFFIXES)) if arg.endswith("/") else [arg]
            if not found:
                raise CacheFileError(f"no cache files (.pt, .safetensors) under {arg}")
            caches += found
            continue
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CACHE_SUFFIXES)
            if not found:
                raise CacheFileError(f"no cache files (.pt, .safetensors) in folder {path}")
            caches += found
        else:
            caches.append(path)
    return caches


def output_names(images: Sequence[Path]) -> dict[Path, str]:
    """`<stem>_cache.pt`; images that share a stem get `<stem>-<8 hex of their resolved path>_cache.pt`."""
    stems = Counter(p.stem for p in images)
    names = {}
    for p in images:
        if stems[p.stem] == 1:
            names[p] = f"{p.stem}{CACHE_SUFFIX}"
        else:
            tag = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]
            names[p] = f"{p.stem}-{tag}{CACHE_SUFFIX}"
    return names


def is_up_to_date(cache: Path | str, image: Path, engine, system_prompt: str | None, options: MediaOptions) -> bool:
    """Same image (or video) bytes, system prompt, processor settings and model weights as the cache on disk."""
    if not (storage.exists(cache) if storage.is_url(cache) else Path(cache).exists()):
        return False
    try:
        meta = read_metadata(cache)
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
    except (CacheFileError, OSError):
        return False
    return (
        meta.image_sha256 == digest
        and meta.system_prompt == system_prompt
        and meta.processor_settings == engine.media_settings(options, [media_kind(image)])
        and meta.fingerprint == engine.fingerprint
        and len(meta.messages) == (2 if system_prompt else 1)  # an image state, not a saved conversation
    )


def cache_images(
    engine,
    arguments: Sequence[str],
    output_dir: str | os.PathLike,
    system_prompt: str | None,
    options: MediaOptions | None = None,
    force: bool = False,
    on_result: Callable[[CacheResult], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> list[CacheResult]:
    """Cache every image and video the arguments name into `output_dir`, one state each; a bad one fails
    alone, the rest go on."""
    options = options or MediaOptions()
    images, results = expand_images(arguments)
    if on_start:
        on_start(len(images))
    if on_result:
        for failure in results:
            on_result(failure)
    if not storage.is_url(output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    for image, name in output_names(images).items():
        target = storage.join(output_dir, name)
        start = time.perf_counter()
        if not force and is_up_to_date(target, image, engine, system_prompt, options):
            result = CacheResult(str(image), target, "skipped")
        else:
            try:
                state = engine.cache([image], system_prompt=system_prompt, options=options)
                state.save(target)
                result = CacheResult(str(image), target, "cached", tokens=state.num_tokens)
            except VlcacheError as exc:
                result = CacheResult(str(image), None, "failed", str(exc))
        result.seconds = time.perf_counter() - start
        results.append(result)
        if on_result:
            on_result(result)
    return results
