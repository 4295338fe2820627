"""`vlcache serve` (here, detached, or on Ray Serve) and the commands that look after a detached server:
`status` and `stop`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import paths, storage
from ..console import info
from ..errors import VlcacheError
from .common import compile_steps, load_engine


def run_serve(args: argparse.Namespace) -> int:
    if args.detach:
        from .. import remote

        child = args.argv[args.argv.index("serve") + 1:]
        return remote.detach(args, child + (["--verbose"] if args.verbose and "--verbose" not in child else []))
    import uvicorn

    from ..decode.probe import remembered
    from ..decode.step import DEFAULT_SPAN, span_for
    from ..serving.server import compile_in_background, create_app, server_config

    local = Path(args.allow_local_files) if args.allow_local_files else None
    if local is not None and not local.is_dir():
        raise VlcacheError(f"--allow-local-files: not a folder: {local}")
    cache_dir = args.cache_dir or paths.states_dir()
    cache_dir = cache_dir if storage.is_url(cache_dir) else Path(cache_dir)  # s3://bucket/prefix/: a fleet's store
    options = serve_options(args, cache_dir, local)
    if args.ray:
        if args.max_context is not None:  # the replicas' engines take the model's context; never silently
            raise VlcacheError("--max-context is not supported with --ray (each replica takes the model's context)")
        return _serve_on_ray(args, options)
    engine = load_engine(args.model, args)
    from ..decode.kvpool import default_kv_memory
    from ..decode.rows import bucket

    options.kv_memory = args.kv_memory or default_kv_memory(engine.device)
    engine.max_context = max_context(engine, args.max_context, options.kv_memory)
    # The positions a compiled step attends over: --max-context when given, else at most decode.step.DEFAULT_SPAN
    # (longer rows step eagerly: no compile, slower).
    span_context = args.max_context or min(engine.max_context, DEFAULT_SPAN)

    buckets = sorted({bucket(n) for n in range(1, args.max_batch + 1)})
    on_start = None
    if args.compile == "auto" and remembered(engine, span=span_for(span_context)) is None:
        # First start on this machine: listen at once with eager steps, decide (and compile) meanwhile.
        info(f"deciding the decode step in the background for {len(buckets)} batch size(s) (remembered in "
             "$VLCACHE_HOME/compile for later starts); eager steps until then")
        on_start = lambda service: compile_in_background(service, buckets, max_context=span_context)  # noqa: E731
    else:
        compile_steps(engine, args.compile, buckets, span_context)
    app = create_app(engine, options, on_start)
    info(f"serving {engine.model_name} on http://{args.host}:{args.port}/v1 (states in {cache_dir}; context "
         f"{engine.max_context:,} tokens)"
         + ("" if args.no_web else f"; the chat page: http://{args.host}:{args.port}/"))
    uvicorn.Server(server_config(app, args.host, args.port, log_level="warning")).run()
    return 0


def max_context(engine, asked: int | None, kv_memory: int) -> int:
    """The longest conversation the server takes: --max-context, else the model's context; never more than the
    model's context, nor than --kv-memory holds for one row (each compiled step attends over this many positions)."""
    model = int(getattr(engine.model.config.get_text_config(), "max_position_embeddings", None) or 2**31)
    if asked is not None and asked > model:
        raise VlcacheError(f"--max-context {asked:,} is beyond the model's context of {model:,} tokens")
    held = kv_memory // engine.kv_bytes_per_token()
    if asked is not None and asked > held:
        raise VlcacheError(f"--max-context {asked:,} needs more K/V than --kv-memory holds ({held:,} tokens); pass a "
                           "larger --kv-memory or a smaller --max-context")
    return asked or min(model, held)


def serve_options(args: argparse.Namespace, cache_dir, local):
    from ..media import MediaOptions
    from ..serving.server import ServeOptions

    return ServeOptions(cache_dir=cache_dir, memory_budget=args.memory_budget, allow_remote_images=args.allow_remote_images,
                        allow_private_urls=args.allow_private_urls, max_image_pixels=args.max_image_pixels,
                        allow_local_files=local, max_body_bytes=args.max_body, max_batch=args.max_batch,
                        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, kv_memory=args.kv_memory,
                        max_state_bytes=args.max_state_bytes,
                        max_uploads=args.max_uploads, max_downloads=args.max_downloads, upload_quota=args.upload_quota,
                        media_workers=args.media_workers,
                        video_decode_pixels=args.video_decode_pixels, media=MediaOptions(fps=args.fps, max_frames=args.max_frames),
                        web=not args.no_web, cors_origin=args.cors_origin, host=args.host,
                        allowed_hosts=tuple(args.allowed_host or ()), share_all_states=args.share_all_states,
                        served_model_name=args.served_model_name, disk_quota=args.disk_quota)


def _serve_on_ray(args: argparse.Namespace, options) -> int:
    import signal

    from ..model import default_model
    from ..scale import ray_serve

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `vlcache stop`: Ray shuts down at exit
    model = args.model or default_model()
    info(f"serving {model} with {args.replicas} replicas on Ray Serve at http://{args.host}:{args.port}/v1 "
         f"(states in {options.cache_dir})")
    ray_serve.run(model, args.device, args.dtype or "auto", options, args.replicas, args.host, args.port, blocking=True,
                  verbose=getattr(args, "verbose", False), quantize=args.quantize or "none", threads=args.threads)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from .. import remote

    return remote.status(args)


def run_stop(args: argparse.Namespace) -> int:
    from .. import remote

    return remote.stop(args)
