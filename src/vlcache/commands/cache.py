"""`vlcache cache`: images and videos into one state (--output) or one state each (--output-dir, also on Ray)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import storage
from ..console import check_output, info
from ..errors import VlcacheError
from .common import check_media_arg, load_engine, media_words, server_url_of


def run_cache(args: argparse.Namespace) -> int:
    url = server_url_of(args)
    if url:
        from .. import remote

        return remote.cache(args, url)
    return _cache_one(args) if args.output_dir is None else _cache_many(args)


def _cache_one(args: argparse.Namespace) -> int:
    """All inputs into one state (an image, a video, or several of them in order)."""
    from ..media import MediaOptions

    for source in args.images:
        check_media_arg(source)
    check_output(args.output, args.images)
    options = MediaOptions(max_pixels=args.max_pixels, fps=args.fps, max_frames=args.max_frames)
    options.check()
    engine = load_engine(args.model, args)
    start = time.perf_counter()
    state = engine.cache(args.images, system_prompt=args.system_prompt, options=options)
    path = state.save(args.output)
    size = storage.size(path) if storage.is_url(path) else Path(path).stat().st_size
    frames = sum(p.get("frames", 0) for p in state.metadata.parts)
    info(
        f"cached {', '.join(args.images)}: {state.num_tokens} tokens ({state.metadata.image_tokens} {media_words(state.metadata)} tokens"
        + (f"; {frames} video frames" if frames else "")
        + f") in {time.perf_counter() - start:.2f}s -> {path} ({size / 2**20:.1f} MiB)"
    )
    return 0


def _cache_many(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not storage.is_url(args.output_dir) and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise VlcacheError(f"--output-dir is a file, not a folder: {args.output_dir}")
    unit = inputs_unit(args.images)  # before the model loads: nothing to cache is an error, not "0 cached"
    bar = None  # made once the count is known: an empty bar drawn before the model's loading lines says nothing

    def on_start(total: int) -> None:
        nonlocal bar
        bar = tqdm(total=total, unit=unit, file=sys.stderr, disable=not (args.progress or sys.stderr.isatty()))

    def on_result(result) -> None:
        if result.status == "failed":
            tqdm.write(f"error: {result.error}", file=sys.stderr)
        if bar is not None:  # arguments that name nothing are reported before the count is known
            bar.update(1)

    if args.ray:
        from ..media import MediaOptions
        from ..model import default_model
        from ..scale.ray_cache import cache_on_ray

        options = MediaOptions(max_pixels=args.max_pixels, fps=args.fps, max_frames=args.max_frames)
        options.check()
        info(f"caching on Ray with {args.workers} worker(s), each loading {args.model or default_model()}")
        results = cache_on_ray(args.images, args.output_dir, args.model or default_model(), args.device,
                               args.dtype or "auto", args.system_prompt, options, args.workers, args.force,
                               on_start=on_start, on_result=on_result, verbose=getattr(args, "verbose", False),
                               quantize=args.quantize or "none", threads=args.threads)
    else:
        engine = load_engine(args.model, args)
        results = engine.cache_images(args.images, args.output_dir, args.system_prompt, args.max_pixels, args.force,
                                      on_result=on_result, on_start=on_start, fps=args.fps, max_frames=args.max_frames)
    if bar is not None:
        bar.close()
    counts = {status: sum(r.status == status for r in results) for status in ("cached", "skipped", "failed")}
    info(f"{counts['cached']} cached, {counts['skipped']} up to date (skipped), {counts['failed']} failed -> {args.output_dir}")
    return 1 if counts["failed"] else 0


def inputs_unit(arguments: list[str]) -> str:
    """What the progress bar counts ("image", "video" or "file"), from the inputs expanded as the batch will.
    Local inputs that name no image or video are an error here, before any model is loaded."""
    from ..batch import expand_images
    from ..media import kind_of

    if any(storage.is_url(a) for a in arguments):
        return "file"  # prefixes in a bucket are listed by the batch itself
    found, missing = expand_images(arguments)
    if not found:
        problems = [r.error for r in missing] or [f"no images or videos in {', '.join(arguments)} (a folder contributes "
                                                   "files ending in .jpg, .png, .webp, .mp4, .webm, .mov, ...)"]
        raise VlcacheError("; ".join(problems))
    kinds = {kind_of(p) for p in found}
    return kinds.pop() if len(kinds) == 1 else "file"
