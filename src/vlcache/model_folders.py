"""Where this machine keeps the model folders it loaded, by weight fingerprint.

A state file names its model by hub id or by the folder's own name, never by the folder's absolute path (a
file sent to a server or a colleague would tell them how this disk is laid out). `vlcache ask --cache FILE`
without --model still finds a local model: the fingerprint in the file's header names the folder here, in
$VLCACHE_HOME/model-folders.json, written when an engine loads a folder. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from . import paths

_KEPT = 256  # the newest fingerprints: a bounded file
_PER_WEIGHTS = 8  # copies of the same weights under other folders (a copy with another chat template)


def _file() -> Path:
    return paths.home() / "model-folders.json"


def remember(fingerprint: str, model: str) -> None:
    """Record that `model`, a local folder, holds the weights `fingerprint` (a hub id: nothing to record).
    Best effort: a read-only home only means --model must name the folder."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return
    known = paths.read_json_dict(_file())
    where = str(folder.resolve())
    folders = [f for f in _folders(known.pop(fingerprint, None)) if f != where] + [where]
    known[fingerprint] = folders[-_PER_WEIGHTS:]
    paths.write_json_atomic(_file(), dict(list(known.items())[-_KEPT:]))


def folder_for(fingerprint: str, name: str) -> str | None:
    """The folder called `name` on this machine last loaded with the weights `fingerprint`, if it is still there."""
    for folder in reversed(_folders(paths.read_json_dict(_file()).get(fingerprint))):
        if Path(folder).name == name and Path(folder).is_dir():
            return folder
    return None


def _folders(value) -> list[str]:
    return [f for f in value if isinstance(f, str)] if isinstance(value, list) else []
