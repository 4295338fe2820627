"""`--compile auto`'s decision, remembered on disk: one file per model, dtype, machine, torch and decode code.

Measuring whether a compiled step is exact and faster costs a compile, a probe and a timing, and on a busy machine
the timing alone could come out either way from one start to the next. So the first start decides (with a
margin, decode.probe) and writes what it chose and why to $VLCACHE_HOME/compile/decisions/<key>.json; later
starts on the same model (weights fingerprint), dtype, machine (CPU model and flags, or the GPU's name, and the
threads torch uses), torch and transformers versions, span and code (a hash of vlcache's decode package, the
families' adapters and the int8 layers, so a changed step is decided again) reuse it without measuring. A file
that cannot be read, or says something else, is ignored
with one note and decided again (then rewritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from ..paths import compile_dir

log = logging.getLogger("vlcache")

STEPS = ("eager", "compiled", "CUDA graphs of the eager step", "traced")  # what a remembered "step" may start with


def key(engine, span: int, backends: list[str]) -> dict:
    """What a decision depends on (each field a string or a number)."""
    return {"model": engine.fingerprint, "dtype": str(engine.dtype).removeprefix("torch."), "machine": machine(engine.device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": _transformers_version(),
            "decode_code": _decode_code(),
            "span": span, "backends": ",".join(backends)}


def machine(device) -> str:
    """The device's identity: the GPU's name, or the CPU's model name and a hash of its flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model.startswith("cpu:"):
                model = "cpu:" + value.strip()
            elif name.strip() == "flags":
                flags = value.strip()
                break
    except OSError:
        pass
    return f"{model} flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def _decode_code() -> str:
    """A hash of the code a step runs beyond torch and transformers: vlcache's decode package, the families'
    adapters and the int8 layers (a changed one is decided again: the exactness probe must see it)."""
    package = Path(__file__).parent.parent
    digest = hashlib.sha256()
    for path in [*sorted(package.glob("decode/*.py")), *sorted(package.glob("families/*.py")), package / "quantize.py"]:
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def path_for(fields: dict) -> Path:
    name = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return compile_dir() / "decisions" / f"{name}.json"


def read(fields: dict) -> dict | None:
    """The remembered decision for `fields`, or None (none yet, or a file that is not one: noted, then ignored)."""
    path = path_for(fields)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning(f"note: cannot read the remembered compile decision {path} ({type(exc).__name__}); deciding again")
        return None
    try:
        data = json.loads(text)
        valid = (isinstance(data, dict) and data.get("key") == fields and isinstance(data.get("step"), str)
                 and data["step"].startswith(STEPS) and isinstance(data.get("reason"), str)
                 and (data.get("backend") is None or isinstance(data.get("backend"), str)))
    except ValueError:
        valid = False
    if not valid:
        log.warning(f"note: ignoring the remembered compile decision {path}: not a decision for this model and "
                    "machine; deciding again")
        return None
    return data


def write(fields: dict, step: str, backend: str | None, reason: str, measured: dict) -> Path | None:
    """Remember a decision (atomically: a reader sees the old file or the new one); None if it could not be."""
    path = path_for(fields)
    data = {"key": fields, "step": step, "backend": backend, "reason": reason, "measured": measured,
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError as exc:
        log.warning(f"note: could not remember the compile decision in {path} ({type(exc).__name__})")
        return None
    return path
