"""Where vlcache keeps its own files: $VLCACHE_HOME (default ~/.cache/vlcache), read when asked (not at import),
so every command, the server and the tests agree on one folder."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "VLCACHE_HOME"


def home() -> Path:
    """$VLCACHE_HOME, or ~/.cache/vlcache."""
    return Path(os.environ.get(HOME_ENV_VAR) or Path.home() / ".cache" / "vlcache")


def states_dir() -> Path:
    """`vlcache serve`'s default --cache-dir."""
    return home() / "states"


def run_file() -> Path:
    """Where `serve --detach` records its pid, URL and log."""
    return home() / "serve.json"


def fingerprints_file() -> Path:
    """Remembered weight fingerprints, by checkpoint identity."""
    return home() / "fingerprints.json"


def file_hashes_file() -> Path:
    """The sha256 of cache files a `--server` client has sent, by path, size, inode and modification time."""
    return home() / "file-hashes.json"


def compile_dir() -> Path:
    """Compiled decode steps (torch.compile's caches), reused by later processes."""
    return home() / "compile"


def checks_file() -> Path:
    """Models outside vlcache's families that passed `vlcache check`, by weight fingerprint."""
    return home() / "checked.json"
