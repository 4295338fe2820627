"""What several commands share: the server they go through, the model load and its stderr lines, the decode
steps, which model a cache file names, and the media checks made before the model loads."""

from __future__ import annotations

import argparse
import os
import time

from ..console import info
from ..errors import VlcacheError


def server_url_of(args: argparse.Namespace) -> str | None:
    from ..client import server_url

    return server_url(getattr(args, "server", None))


def load_engine(model: str | None, args: argparse.Namespace, meta=None):
    """Load the model (--device, --dtype, else the dtype of the cache `meta` describes, else auto; --quantize
    likewise; --threads) with the CLI's two stderr lines; transformers' own output only with --verbose."""
    from ..engine import Engine
    from ..model import default_model, quiet_transformers

    quiet_transformers(verbose=getattr(args, "verbose", False))
    threads = apply_threads(args)
    name = model or default_model()
    dtype = args.dtype or (meta.dtype if meta is not None else "auto")
    quantize = quantization(args, meta)
    if args.dtype and args.dtype != "auto":
        why = f"--dtype {args.dtype}"
    elif not args.dtype and meta is not None:
        why = "the cache's dtype"
    else:
        why = None  # --dtype auto chose: the engine says why
    weights = "" if quantize == "none" else f", {quantize} weights"
    info(f"loading {name} ({args.device}, {dtype}{weights})...")
    start = time.perf_counter()
    engine = Engine.load(name, device=args.device, dtype=dtype, generation_config=overrides(args), quantize=quantize)
    info(f"loaded in {time.perf_counter() - start:.1f}s on {engine.device}, {threads} thread{'s' * (threads != 1)}, as "
         f"{str(engine.dtype).removeprefix('torch.')}{weights} ({why or engine.dtype_reason})")
    return engine


def apply_threads(args: argparse.Namespace) -> int:
    """--threads N: torch computes with N threads from here on (set before the model loads); without it, what
    torch chose. Returns the count, for the load line."""
    import torch

    threads = getattr(args, "threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def quantization(args: argparse.Namespace, meta=None) -> str:
    """--quantize, else the quantization of the cache `meta` describes (its states are that model's), else none."""
    return getattr(args, "quantize", None) or (meta.quantization if meta is not None else "none")


def overrides(args: argparse.Namespace) -> dict | None:
    """--generation-config's settings (later ones win), or None."""
    override = {k: v for item in getattr(args, "generation_config", None) or () for k, v in item.items()}
    return override or None


def one_command(args: argparse.Namespace) -> str:
    """--compile for a command that answers and ends: auto is off (it cannot pay back a compile). The guide's
    scripts share ask's flags but not this one: off for them too."""
    mode = getattr(args, "compile", "auto")
    return "off" if mode == "auto" else mode


def compile_steps(engine, mode: str, buckets: list[int], max_context: int | None = None) -> None:
    """Choose the decode step (decode.probe) and say which, and why, on stderr."""
    if mode == "off":
        return
    info(f"preparing decode steps ({mode}) for {len(buckets)} batch size(s): {', '.join(map(str, buckets))} (minutes on a "
         "first start, seconds once $VLCACHE_HOME/compile holds them; --compile off starts at once)...")
    engine.compile_steps(mode, buckets, max_context=max_context)  # its last line says what was chosen and why


def first_metadata(caches: list):
    """The metadata of the first readable cache (which model and dtype to load); one file's error if none is."""
    from ..state import read_metadata

    error = None
    for cache in caches:
        try:
            return read_metadata(cache)
        except VlcacheError as exc:
            error = error or exc
    if error is not None:
        raise error
    return None


def model_named_by(meta) -> str:
    """The model a cache file names, when no --model or VLCACHE_MODEL says otherwise: a stranger's file must not
    decide what is downloaded, so only a local folder or a model already in the Hugging Face cache is taken."""
    from ..model import MODEL_ENV_VAR, is_available_locally
    from ..model_folders import folder_for

    # A file names a local folder by its name alone (no path in a header); its fingerprint says where it is here.
    folder = folder_for(meta.fingerprint, meta.model)
    if folder is not None:
        info(f"using {folder}, the model folder the cache names")
        return folder
    if not is_available_locally(meta.model):
        if os.environ.get(MODEL_ENV_VAR):
            return os.environ[MODEL_ENV_VAR]
        if _is_folder_name(meta.model):  # a folder that moved or is on another machine: nothing to download
            raise VlcacheError(
                f"the cache was made with the model folder {meta.model}, which is not on this machine; pass --model "
                "with where that model is now (or set VLCACHE_MODEL)"
            )
        raise VlcacheError(
            f"the cache was made with {meta.model}, which is not on this machine; pass --model {meta.model} to "
            "download and use it (vlcache does not download what a cache file names on its own)"
        )
    info(f"using {meta.model}, the model the cache names")
    return meta.model


def _is_folder_name(name: str) -> bool:
    """A model named by a path or a folder's name, never a hub id ("org/name"): absolute, relative with ./ or ~,
    deeper, or one name alone (how files since issue 31 name a local folder)."""
    return name.startswith(("/", ".", "~", "\\")) or ":" in name or name.count("/") != 1


def _check_image_arg(path: str) -> None:
    # Fail before the model load (seconds to minutes) when the image cannot even be opened.
    from ..images import load_image

    load_image(path)


def check_media_arg(path: str) -> None:
    """An image opens; a video's container is probed (no frame decoded): before the model load."""
    from .. import video

    if not video.is_video_path(path):
        return _check_image_arg(path)
    data, name = video.read_video_bytes(path)
    video.probe(data, name, video.MAX_DECODE_PIXELS)


def media_words(meta) -> str:
    return "image and video" if any(p["type"] == "video" for p in meta.parts) else "image"


def last(iterable):
    item = None
    for item in iterable:
        pass
    return item


