"""Where vlcache keeps its own files: $VLCACHE_HOME (default ~/.cache/vlcache), read when asked (not at import),
so every command, the server and the tests agree on one folder."""

from __future__ import annotations

import json
import os
import tempfile
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


def private_compile_dir() -> Path:
    """torch.compile's cache for vlcache: $VLCACHE_HOME/compile/inductor, owner-only (0700). Compiled kernels are
    loaded from it as code, so it is never torch's default, a folder in the shared temporary directory that another
    user may have made first. Torch still puts a few things in that default whatever the setting (precompiled
    headers, some caches): it must be this user's own and written by no one else, and is made so when missing.
    PermissionError otherwise."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    _owner_only(Path(default_cache_dir()), fix=False)
    folder = compile_dir() / "inductor"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for part in (compile_dir(), folder):
        _owner_only(part, fix=True)
    return folder


def _owner_only(folder: Path, fix: bool) -> None:
    """Make `folder` (0700) if missing; refuse one of another user's, and one others may write in unless `fix`."""
    try:
        folder.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    info = folder.stat()  # a link is judged by what it leads to
    if not folder.is_dir() or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise PermissionError(f"{folder} belongs to another user")
    if info.st_mode & 0o022 and not fix:
        raise PermissionError(f"{folder} may be written by other users")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)


def checks_file() -> Path:
    """Models outside vlcache's families that passed `vlcache check`, by weight fingerprint."""
    return home() / "checked.json"


def served_name(model: str) -> str:
    """The name a server's clients see for its model: a hub id as it is, a local folder by its own name alone (its
    absolute path would tell every client how the server's disk is laid out)."""
    return Path(model).name if Path(model).exists() else model


def read_json_dict(path: Path) -> dict:
    """A small JSON record file of vlcache's (fingerprints, checks, model folders): {} if absent or damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: dict) -> None:
    """Atomic (two processes writing at once leave one whole file), owner-only (mkstemp's 0600) and best effort:
    a read-only home only costs recomputing the record next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
