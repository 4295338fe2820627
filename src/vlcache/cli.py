"""The `vlcache` command: cache, ask, inspect. Answers go to stdout, everything else to stderr.

main() only parses arguments and calls the library; a VlcacheError becomes `error: <message>` and exit 1,
argument errors exit 2 (argparse), and no traceback is shown unless --debug is given.
"""

from __future__ import annotations

import argparse
import os
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import paths, storage
from .console import (UsageError, add_timings, chat_loop, check_output, check_prompt, info, print_answer, print_json_answers,
                      print_streamed, read_prompts, read_schema)
from .defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SYSTEM_PROMPT
from .errors import VlcacheError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")


# -- argument types: validated at parse time ---------------------------------------------------------------

def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def probability(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"ports go up to 65535, got {value}")
    return value


def web_origin(text: str) -> str:
    """--cors-origin: scheme://host[:port], as browsers write it in the Origin header."""
    origin = text.rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
        raise argparse.ArgumentTypeError(f"expected an origin like https://example.com or http://localhost:3000, got {text!r}")
    return origin


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text: str) -> int:
    """'4GiB', '512MB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 4GiB, 512MB or 1048576, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


AUTO_DTYPE_HELP = "auto: what the device computes fastest"


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str, dtype_help: str) -> None:
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto, the GPU if any)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=f"compute dtype (default: {dtype_help})")
    parser.add_argument("--generation-config", metavar="KEY=VALUE|FILE", action="append", type=_generation_setting,
                        default=None, help="replace a setting of the model's generation_config.json (VALUE as JSON, "
                        "e.g. num_beams=1), or several from a JSON file; repeatable (default: none)")


def _generation_setting(text: str) -> dict:
    from .decode.rules import parse_override

    try:
        return parse_override([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_compile_argument(parser: argparse.ArgumentParser, auto: str) -> None:
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help=f"compiled, fixed-shape decode steps (CUDA graphs on CUDA); auto: {auto} (default: auto)")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help=f'default: "{DEFAULT_SYSTEM_PROMPT}"')
    add_model_arguments(parser, "model id or local folder (default: $VLCACHE_MODEL or Qwen/Qwen3-VL-2B-Instruct)",
                        AUTO_DTYPE_HELP)
    parser.add_argument("--max-pixels", metavar="N", type=positive_int, default=None,
                        help="downscale larger images and video frames to this many pixels")
    parser.add_argument("--fps", metavar="F", type=positive_float, default=None,
                        help="video frames sampled per second (default: the model's video processor's, e.g. 2)")
    parser.add_argument("--max-frames", metavar="N", type=positive_int, default=None,
                        help="at most this many frames per video (default: the video processor's limit)")
    add_server_argument(parser, "compute the state on a running `vlcache serve` at URL and save it here (default: "
                                "$VLCACHE_SERVER; unset: load the model in this process)")
    parser.set_defaults(output_dir=None, force=False, progress=False, ray=False, workers=1)


def add_generation_arguments(parser: argparse.ArgumentParser, max_tokens_flags: tuple[str, ...]) -> None:
    parser.add_argument(*max_tokens_flags, dest="max_new_tokens", metavar="N", type=positive_int,
                        default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"most tokens to generate (default: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", metavar="T", type=non_negative_float, default=None,
                        help="0 = greedy (default: the model's generation config)")
    parser.add_argument("--top-p", metavar="P", type=probability, default=None,
                        help="nucleus sampling: sample from the most likely tokens up to this probability mass, in (0, 1] "
                             "(default: the model's generation config)")
    parser.add_argument("--seed", metavar="S", type=int, default=None, help="seed for sampling, for repeatable answers")
    add_model_arguments(parser, "model id or local folder (default: the model recorded in the cache)",
                        f"the cache's own; without a cache {AUTO_DTYPE_HELP}")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer instead of the text")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come (default when stdout is a terminal)")
    add_server_argument(parser, "answer through a running `vlcache serve` at URL (default: $VLCACHE_SERVER; unset: load "
                                "the model in this process)")


def add_server_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--server", default=None, metavar="URL", help=help_text)


def add_ask_arguments(parser: argparse.ArgumentParser, max_tokens_flags: tuple[str, ...], many: bool = False) -> None:
    """`many`: --cache and --prompt repeat (vlcache ask); otherwise one of each (the guide's script)."""
    if many:
        parser.add_argument("--cache", dest="caches", action="append", metavar="PATH", default=None,
                            help="cache file or folder of caches; repeat for several (omit for a text-only chat)")
        parser.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", default=None,
                            help="a question; repeat for several")
        parser.add_argument("--prompts-file", metavar="FILE", default=None, help="a file of questions, one a line")
        parser.add_argument("--image", default=None, metavar="PATH",
                            help="ask about an image without a cache file (processes it now: the uncached path)")
        parser.add_argument("--sequential", action="store_true", help="answer several questions one by one, not as a batch")
        parser.add_argument("--json-schema", metavar="FILE", default=None,
                            help="answer with JSON held to this JSON schema (a file); prints one JSON object per "
                                 "image and question")
    else:
        parser.add_argument("--cache", dest="caches", type=lambda text: [text], default=None,
                            help="cache file from save_embeddings.py (omit for a text-only prompt)")
        parser.add_argument("--prompt", dest="prompts", type=lambda text: [text], required=True, help="your question")
        parser.set_defaults(prompts_file=None, image=None, sequential=False, json_schema=None)
    parser.add_argument("--system-prompt", default=None, metavar="TEXT",
                        help="system turn for a text-only chat (default: none) or for --image (default: "
                             f'"{DEFAULT_SYSTEM_PROMPT}"); a cache keeps the one it was made with')
    add_generation_arguments(parser, max_tokens_flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlcache", description="Process an image once, ask it many questions.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"vlcache {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="process images and videos and save the model state after them")
    cache.add_argument("images", nargs="+", metavar="MEDIA",
                       help="image and video files (.mp4, .webm, .mov, ...); with --output-dir also folders or globs")
    where = cache.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", "-o", metavar="PATH",
                       help="cache file to write: ONE state holding all the inputs, in order, in one "
                                              "user turn (safetensors, any name; its folder must exist)")
    where.add_argument("--output-dir", "-d", metavar="DIR",
                       help="folder for one cache per input, named <stem>_cache.pt (created if needed)")
    add_cache_arguments(cache)
    cache.add_argument("--force", action="store_true", help="re-cache images whose cache is up to date")
    cache.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    cache.add_argument("--ray", action="store_true",
                       help="with --output-dir: cache on a Ray cluster ($RAY_ADDRESS, or a local one started for the call); "
                            "states get content-addressed names and a manifest.json")
    cache.add_argument("--workers", metavar="N", type=positive_int, default=1,
                       help="with --ray: model copies (actors) at once (default: 1)")
    cache.set_defaults(run=run_cache)

    ask = sub.add_parser("ask", help="answer prompts from cache files (or text-only without --cache)")
    add_ask_arguments(ask, ("--max-new-tokens", "--max_new_tokens"), many=True)
    add_compile_argument(ask, "off, since one command's questions cannot pay back a compile")
    ask.set_defaults(run=run_ask)

    chat = sub.add_parser("chat", help="a conversation about a cached image (reads stdin; /reset, /save PATH)")
    chat.add_argument("--cache", required=True, metavar="PATH", help="cache file (an image or a saved conversation)")
    add_generation_arguments(chat, ("--max-new-tokens", "--max_new_tokens"))
    add_compile_argument(chat, "off, since one conversation cannot pay back a compile")
    chat.set_defaults(run=run_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible server that reuses image states automatically")
    add_model_arguments(serve, "model id or local folder (default: $VLCACHE_MODEL or Qwen/Qwen3-VL-2B-Instruct)",
                        AUTO_DTYPE_HELP)
    add_compile_argument(serve, "compiled where the exactness probe holds and it measures faster, checked at start")
    serve.add_argument("--host", metavar="HOST", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", metavar="PORT", type=port_number, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--cache-dir", metavar="DIR", default=None,
                       help=f"folder or URL where states are written (default: $VLCACHE_HOME/states, now {paths.states_dir()})")
    serve.add_argument("--memory-budget", metavar="SIZE", type=byte_size, default=byte_size("4GiB"),
                       help="bytes of states kept in memory (default: 4GiB)")
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image and video URLs")
    serve.add_argument("--allow-private-urls", action="store_true",
                       help="with --allow-remote-images: also private, loopback and link-local addresses")
    serve.add_argument("--max-image-pixels", metavar="N", type=positive_int, default=25_000_000,
                       help="refuse images and video frames declaring more pixels, before decoding them (default: 25000000)")
    serve.add_argument("--fps", metavar="F", type=positive_float, default=None,
                       help="video frames sampled per second (default: the model's video processor's, e.g. 2)")
    serve.add_argument("--max-frames", metavar="N", type=positive_int, default=None,
                       help="at most this many frames per video (default: the video processor's limit)")
    serve.add_argument("--allow-local-files", default=None, metavar="DIR", help="allow image and video paths under DIR")
    serve.add_argument("--max-body", metavar="SIZE", type=byte_size, default=byte_size("32MiB"),
                       help="largest request body (default: 32MiB)")
    serve.add_argument("--max-batch", metavar="N", type=positive_int, default=16,
                       help="most requests decoded together (default: 16)")
    serve.add_argument("--max-queue", metavar="N", type=non_negative_int, default=64,
                       help="requests that may wait beyond the batch; more get 429 (default: 64)")
    serve.add_argument("--prefill-chunk", metavar="N", type=positive_int, default=256,
                       help="most prefill tokens between two decode steps (default: 256)")
    serve.add_argument("--max-state-bytes", metavar="SIZE", type=byte_size, default=None,
                       help="largest cache file a client (--server) may upload (default: the model's K/V at its context length)")
    serve.add_argument("--max-uploads", metavar="N", type=positive_int, default=2,
                       help="uploads received at once; more get 429 (default: 2)")
    serve.add_argument("--upload-quota", metavar="SIZE", type=byte_size, default=None,
                       help="bytes of uploaded cache files kept, least recently used removed (default: 4x --max-state-bytes)")
    serve.add_argument("--media-workers", metavar="N", type=positive_int, default=4,
                       help="threads that fetch and decode images and videos (default: 4)")
    serve.add_argument("--video-decode-pixels", metavar="N", type=positive_int, default=4_000_000_000,
                       help="frame pixels one request may decode, longer clips seek to keyframes (default: 4000000000)")
    serve.add_argument("--no-web", action="store_true", help="no chat page at / (the API alone)")
    serve.add_argument("--cors-origin", type=web_origin, default=None, metavar="ORIGIN",
                       help="one other origin whose pages may call the API, e.g. https://example.com (default: none)")
    serve.add_argument("--ray", action="store_true",
                       help="run --replicas copies under Ray Serve ($RAY_ADDRESS or a local Ray), routed by image")
    serve.add_argument("--replicas", metavar="N", type=positive_int, default=2, help="with --ray: server replicas (default: 2)")
    serve.add_argument("--detach", action="store_true",
                       help=f"run in the background; pid, URL and log go to $VLCACHE_HOME/serve.json (now {paths.run_file()}); "
                            "`vlcache stop` ends it")
    serve.set_defaults(run=run_serve)

    status = sub.add_parser("status", help="whether a vlcache server is up (--server URL, $VLCACHE_SERVER, or --detach's)")
    add_server_argument(status, "the server to ask (default: $VLCACHE_SERVER; unset: the one `vlcache serve --detach` started)")
    status.add_argument("--json", action="store_true", help="print the server's /health answer as one JSON object")
    status.set_defaults(run=run_status)
    stop = sub.add_parser("stop", help="stop the server `vlcache serve --detach` started")
    add_server_argument(stop, "stop it only if it is the server at URL (default: whichever `vlcache serve --detach` "
                              "started; $VLCACHE_SERVER is not read: stop never ends a server it did not start)")
    stop.add_argument("--json", action="store_true", help="print what was stopped as one JSON object")
    stop.set_defaults(run=run_stop)

    inspect = sub.add_parser("inspect", help="show what a cache file holds")
    inspect.add_argument("path", metavar="PATH", help="cache file or URL (only its header is read)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object: the metadata, file and KV bytes")
    inspect.set_defaults(run=run_inspect)

    check = sub.add_parser("check", help="test whether cached answers equal transformers' own for a model (exit 1 if not)")
    add_model_arguments(check, "model id or local folder (default: $VLCACHE_MODEL or Qwen/Qwen3-VL-2B-Instruct)",
                        AUTO_DTYPE_HELP)
    check.set_defaults(run=run_check)

    for p in sub.choices.values():  # flags every command takes after its name; its own usage on an error
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        p.set_defaults(subparser=p)
    return parser


VERBOSE_HELP = "also show what libraries print (transformers' loading bar and warnings)"


# -- commands ----------------------------------------------------------------------------------------------

def usage_problem(args: argparse.Namespace) -> str | None:
    """Checks that need more than one argument, made before anything runs."""
    if args.command == "cache" and getattr(args, "ray", False) and args.output_dir is None:
        return "--ray caches into --output-dir DIR (a folder or a URL), one state per input"
    if args.command == "cache" and args.output_dir is None and any(Path(p).is_dir() for p in args.images):
        return "--output takes files (their images and videos make one state); use --output-dir DIR for a folder"
    if args.command == "ask" and not (args.prompts or args.prompts_file):
        return "give a question with --prompt or --prompts-file"
    if args.command == "ask" and args.image and args.caches:
        return "--image and --cache exclude each other"
    return None


def run_cache(args: argparse.Namespace) -> int:
    url = _server(args)
    if url:
        from . import remote

        return remote.cache(args, url)
    return _cache_one(args) if args.output_dir is None else _cache_many(args)


def _server(args: argparse.Namespace) -> str | None:
    from .client import server_url

    return server_url(getattr(args, "server", None))


def _cache_one(args: argparse.Namespace) -> int:
    """All inputs into one state (an image, a video, or several of them in order)."""
    from .media import MediaOptions

    for source in args.images:
        _check_media_arg(source)
    check_output(args.output, args.images)
    options = MediaOptions(max_pixels=args.max_pixels, fps=args.fps, max_frames=args.max_frames)
    options.check()
    engine = _load_engine(args.model, args)
    start = time.perf_counter()
    state = engine.cache(args.images, system_prompt=args.system_prompt, options=options)
    path = state.save(args.output)
    size = storage.size(path) if storage.is_url(path) else Path(path).stat().st_size
    frames = sum(p.get("frames", 0) for p in state.metadata.parts)
    info(
        f"cached {', '.join(args.images)}: {state.num_tokens} tokens ({state.metadata.image_tokens} {_media_words(state.metadata)} tokens"
        + (f"; {frames} video frames" if frames else "")
        + f") in {time.perf_counter() - start:.2f}s -> {path} ({size / 2**20:.1f} MiB)"
    )
    return 0


def _cache_many(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not storage.is_url(args.output_dir) and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise VlcacheError(f"--output-dir is a file, not a folder: {args.output_dir}")
    unit = _inputs_unit(args.images)  # before the model loads: nothing to cache is an error, not "0 cached"
    bar = tqdm(total=0, unit=unit, file=sys.stderr, disable=not (args.progress or sys.stderr.isatty()))
    started = False  # arguments that name nothing are reported before the count of images is known

    def on_start(total: int) -> None:
        nonlocal started
        started = True
        bar.total = total
        bar.refresh()

    def on_result(result) -> None:
        if result.status == "failed":
            tqdm.write(f"error: {result.error}", file=sys.stderr)
        if started:
            bar.update(1)

    if args.ray:
        from .media import MediaOptions
        from .model import default_model
        from .scale.ray_cache import cache_on_ray

        options = MediaOptions(max_pixels=args.max_pixels, fps=args.fps, max_frames=args.max_frames)
        options.check()
        info(f"caching on Ray with {args.workers} worker(s), each loading {args.model or default_model()}")
        results = cache_on_ray(args.images, args.output_dir, args.model or default_model(), args.device,
                               args.dtype or "auto", args.system_prompt, options, args.workers, args.force,
                               on_start=on_start, on_result=on_result)
    else:
        engine = _load_engine(args.model, args)
        results = engine.cache_images(args.images, args.output_dir, args.system_prompt, args.max_pixels, args.force,
                                      on_result=on_result, on_start=on_start, fps=args.fps, max_frames=args.max_frames)
    bar.close()
    counts = {status: sum(r.status == status for r in results) for status in ("cached", "skipped", "failed")}
    info(f"{counts['cached']} cached, {counts['skipped']} up to date (skipped), {counts['failed']} failed -> {args.output_dir}")
    return 1 if counts["failed"] else 0


def _inputs_unit(arguments: list[str]) -> str:
    """What the progress bar counts ("image", "video" or "file"), from the inputs expanded as the batch will.
    Local inputs that name no image or video are an error here, before any model is loaded."""
    from .batch import expand_images
    from .media import kind_of

    if any(storage.is_url(a) for a in arguments):
        return "file"  # prefixes in a bucket are listed by the batch itself
    found, missing = expand_images(arguments)
    if not found:
        problems = [r.error for r in missing] or [f"no images or videos in {', '.join(arguments)} (a folder contributes "
                                                   "files ending in .jpg, .png, .webp, .mp4, .webm, .mov, ...)"]
        raise VlcacheError("; ".join(problems))
    kinds = {kind_of(p) for p in found}
    return kinds.pop() if len(kinds) == 1 else "file"


def run_ask(args: argparse.Namespace) -> int:
    from .batch import expand_caches

    url = _server(args)
    schema = read_schema(args.json_schema) if args.json_schema else None
    if url:
        from . import remote

        if schema is not None:
            raise UsageError("--json-schema answers in this process; leave out --server (and $VLCACHE_SERVER)")
        return remote.ask(args, url)
    prompts = read_prompts(args)
    for i, text in enumerate(prompts):
        check_prompt(text, "--prompt" if len(prompts) == 1 else f"prompt {i + 1}")
    caches = expand_caches(args.caches) if args.caches else []
    meta = _first_metadata(caches)
    model = args.model or (_model_named_by(meta) if meta else None)
    if args.image:
        _check_media_arg(args.image)
    start = time.perf_counter()
    engine = _load_engine(model, args, meta)
    _compile_steps(engine, _one_command(args), [1])
    extra = {"model_load_s": time.perf_counter() - start}
    if schema is not None:
        engine.grammars.compile(schema)  # a schema the grammar library refuses fails here, before any answer
        args.generation = {"json_schema": schema}
    if args.image:  # the uncached path: process the image now, in memory
        start = time.perf_counter()
        state = engine.cache([args.image], system_prompt=args.system_prompt or DEFAULT_SYSTEM_PROMPT)
        extra["image_prefill_s"] = time.perf_counter() - start
        return _ask_state(engine, state, args.image, prompts, args, extra, single=len(prompts) == 1)
    if not caches:
        return _ask_text_only(engine, prompts, args, extra)
    failed = 0
    for cache in caches:
        try:
            start = time.perf_counter()
            state = engine.load_state(cache)
            extra["state_load_s"] = time.perf_counter() - start
        except VlcacheError as exc:
            if len(caches) == 1:
                raise
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        # An answer --json-schema could not complete (cut by --max-new-tokens) fails the run, after the others.
        failed += bool(_ask_state(engine, state, str(cache), prompts, args, extra, single=len(prompts) == 1 and len(caches) == 1))
    return 1 if failed else 0


def _ask_state(engine, state, label: str, prompts: list[str], args: argparse.Namespace, extra: dict, single: bool) -> int:
    """One question about one source prints (and may stream) the bare answer; otherwise one per pair."""
    options = (args.max_new_tokens, args.temperature, args.top_p, args.seed)
    generation = getattr(args, "generation", {})
    if generation:
        answers = [_last(engine.stream(state, p, *options, **generation)).answer for p in prompts] if args.sequential \
            else engine.ask_many(state, prompts, *options, **generation)
        return print_json_answers(answers, args, label, prompts, extra, single)
    if single:
        print_streamed(engine.stream(state, prompts[0], *options), args, extra)
        return 0
    if args.sequential:
        answers = [engine.ask(state, p, *options) for p in prompts]
    else:
        answers = engine.ask_many(state, prompts, *options)
    for prompt_text, answer in zip(prompts, answers):
        add_timings(answer, extra)
        print_answer(answer, args, cache=label, prompt=prompt_text)
    return 0


def _ask_text_only(engine, prompts: list[str], args: argparse.Namespace, extra: dict) -> int:
    generation = getattr(args, "generation", {})
    if generation:
        answers = [_last(engine.stream(None, p, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                       system_prompt=args.system_prompt, **generation)).answer for p in prompts]
        return print_json_answers(answers, args, None, prompts, extra, len(prompts) == 1)
    for prompt_text in prompts:
        stream = engine.stream(None, prompt_text, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                               system_prompt=args.system_prompt)
        if len(prompts) == 1:
            print_streamed(stream, args, extra)
        else:
            print_answer(_last(stream).answer, args, cache=None, prompt=prompt_text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    url = _server(args)
    if url:
        from . import remote

        return remote.chat(args, url)
    from .conversation import Conversation
    from .state import read_metadata

    meta = read_metadata(args.cache)
    engine = _load_engine(args.model or _model_named_by(meta), args, meta)
    _compile_steps(engine, _one_command(args), [1])
    chat = Conversation(engine, engine.load_state(args.cache))

    def save(target: str) -> None:
        path = chat.save(target)
        info(f"saved the conversation ({chat.turns} turns) to {path}")

    options = (args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return chat_loop(lambda text: print_streamed(chat.stream(text, *options), args), chat.reset, save)


def _last(iterable):
    item = None
    for item in iterable:
        pass
    return item


def run_serve(args: argparse.Namespace) -> int:
    if args.detach:
        from . import remote

        child = args.argv[args.argv.index("serve") + 1:]
        return remote.detach(args, child + (["--verbose"] if args.verbose and "--verbose" not in child else []))
    import uvicorn

    from .serving.server import create_app, server_config

    local = Path(args.allow_local_files) if args.allow_local_files else None
    if local is not None and not local.is_dir():
        raise VlcacheError(f"--allow-local-files: not a folder: {local}")
    cache_dir = args.cache_dir or paths.states_dir()
    cache_dir = cache_dir if storage.is_url(cache_dir) else Path(cache_dir)  # s3://bucket/prefix/: a fleet's store
    options = _serve_options(args, cache_dir, local)
    if args.ray:
        return _serve_on_ray(args, options)
    engine = _load_engine(args.model, args)
    from .decode.rows import bucket

    buckets = sorted({bucket(n) for n in range(1, args.max_batch + 1)})
    _compile_steps(engine, args.compile, buckets)
    app = create_app(engine, options)
    info(f"serving {engine.model_name} on http://{args.host}:{args.port}/v1 (states in {cache_dir})"
         + ("" if args.no_web else f"; the chat page: http://{args.host}:{args.port}/"))
    uvicorn.Server(server_config(app, args.host, args.port, log_level="warning")).run()
    return 0


def _serve_options(args: argparse.Namespace, cache_dir, local):
    from .media import MediaOptions
    from .serving.server import ServeOptions

    return ServeOptions(cache_dir=cache_dir, memory_budget=args.memory_budget, allow_remote_images=args.allow_remote_images,
                        allow_private_urls=args.allow_private_urls, max_image_pixels=args.max_image_pixels,
                        allow_local_files=local, max_body_bytes=args.max_body, max_batch=args.max_batch,
                        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, max_state_bytes=args.max_state_bytes,
                        max_uploads=args.max_uploads, upload_quota=args.upload_quota, media_workers=args.media_workers,
                        video_decode_pixels=args.video_decode_pixels, media=MediaOptions(fps=args.fps, max_frames=args.max_frames),
                        web=not args.no_web, cors_origin=args.cors_origin)


def _serve_on_ray(args: argparse.Namespace, options) -> int:
    import signal

    from .model import default_model
    from .scale import ray_serve

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `vlcache stop`: Ray shuts down at exit
    model = args.model or default_model()
    info(f"serving {model} with {args.replicas} replicas on Ray Serve at http://{args.host}:{args.port}/v1 "
         f"(states in {options.cache_dir})")
    ray_serve.run(model, args.device, args.dtype or "auto", options, args.replicas, args.host, args.port, blocking=True)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from . import remote

    return remote.status(args)


def run_stop(args: argparse.Namespace) -> int:
    from . import remote

    return remote.stop(args)


def run_inspect(args: argparse.Namespace) -> int:
    from .header import read_header, read_metadata

    header = read_header(args.path)
    meta = read_metadata(args.path)
    size = storage.size(args.path) if storage.is_url(args.path) else Path(args.path).stat().st_size
    kv_bytes = sum(
        t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items() if name.startswith("layers.")
    )
    info = {"path": str(args.path), "file_bytes": size, "kv_bytes": kv_bytes, **meta.__dict__}
    if args.json:
        print(json.dumps(info))
        return 0
    turns = sum(1 for m in meta.messages if m.get("role") == "assistant")
    lines = [
        f"file:          {args.path} ({size:,} bytes; KV {kv_bytes:,} bytes)",
        f"model:         {meta.model}",
        f"family:        {meta.family}; layers: {_layer_summary(meta.layer_kinds)}",
        f"fingerprint:   {meta.fingerprint}",
        f"dtype:         {meta.dtype}",
        f"system prompt: {meta.system_prompt!r}",
        *_part_lines(meta),
        f"max pixels:    {meta.max_pixels or 'processor default'}",
        f"tokens:        {meta.prefix_tokens} ({meta.image_tokens} {_media_words(meta)} tokens)",
        f"conversation:  {turns} saved turns" if turns else "conversation:  none (image state)",
        f"created:       {meta.created}",
        "versions:      " + ", ".join(f"{k} {v}" for k, v in meta.versions.items()),
        f"format:        vlcache {meta.format_version}",
    ]
    print("\n".join(lines))
    return 0


def _media_words(meta) -> str:
    return "image and video" if any(p["type"] == "video" for p in meta.parts) else "image"


def _part_lines(meta) -> list[str]:
    """One line per image and video of the state (files before format 3 name one image)."""
    parts = meta.parts or [{"type": "image", "path": meta.image_path, "size": meta.image_size, "sha256": meta.image_sha256}]
    lines = []
    for part in parts:
        w, h = part["size"]
        line = f"{part['type'] + ':':<15}{part.get('path') or '(bytes)'} ({w}x{h}, sha256 {part['sha256'][:16]}...)"
        if part["type"] == "video":
            stamps = part.get("timestamps") or [0]
            line += (f"; {part['frames']} frames sampled, at {stamps[0]:g}-{stamps[-1]:g} s, from a source of "
                     f"{part['total_frames']} frames at {part['fps']:g} fps")
        lines.append(line)
    return lines


def _layer_summary(kinds: list) -> str:
    """'3 sliding_attention, 1 full_attention' in layer order of first appearance."""
    if not kinds:
        return "full_attention (a format 1 file)"
    from .header import SHARED, shared_source

    own = [kind for kind in kinds if shared_source(kind) is None]
    counts = {kind: own.count(kind) for kind in dict.fromkeys(own)}
    out = [f"{n} {kind}" for kind, n in counts.items()]
    shared = [f"{i} reads {shared_source(kind)}" for i, kind in enumerate(kinds) if shared_source(kind) is not None]
    if shared:  # Gemma 4: layers that read another layer's K/V and store none
        out.append(f"{len(shared)} {SHARED} (layer {', '.join(shared)})")
    return ", ".join(out)


def run_check(args: argparse.Namespace) -> int:
    from .check import run

    return run(args.model, device=args.device, dtype=args.dtype or "auto", generation_config=_overrides(args))


# -- plumbing ----------------------------------------------------------------------------------------------

def _overrides(args: argparse.Namespace) -> dict | None:
    """--generation-config's settings (later ones win), or None."""
    override = {k: v for item in getattr(args, "generation_config", None) or () for k, v in item.items()}
    return override or None


def _load_engine(model: str | None, args: argparse.Namespace, meta=None):
    """Load the model (--device, --dtype, else the dtype of the cache `meta` describes, else auto) with the CLI's
    two stderr lines; transformers' own output only with --verbose."""
    from .engine import Engine
    from .model import default_model, quiet_transformers

    quiet_transformers(verbose=getattr(args, "verbose", False))
    name = model or default_model()
    dtype = args.dtype or (meta.dtype if meta is not None else "auto")
    if args.dtype and args.dtype != "auto":
        why = f"--dtype {args.dtype}"
    elif not args.dtype and meta is not None:
        why = "the cache's dtype"
    else:
        why = None  # --dtype auto chose: the engine says why
    info(f"loading {name} ({args.device}, {dtype})...")
    start = time.perf_counter()
    engine = Engine.load(name, device=args.device, dtype=dtype, generation_config=_overrides(args))
    info(f"loaded in {time.perf_counter() - start:.1f}s on {engine.device} as "
         f"{str(engine.dtype).removeprefix('torch.')} ({why or engine.dtype_reason})")
    return engine


def _one_command(args: argparse.Namespace) -> str:
    """--compile for a command that answers and ends: auto is off (it cannot pay back a compile). The guide's
    scripts share ask's flags but not this one: off for them too."""
    mode = getattr(args, "compile", "auto")
    return "off" if mode == "auto" else mode


def _compile_steps(engine, mode: str, buckets: list[int]) -> None:
    """Choose the decode step (decode.probe) and say which, and why, on stderr."""
    if mode == "off":
        return
    info(f"preparing decode steps ({mode}) for {len(buckets)} batch size(s): {', '.join(map(str, buckets))}...")
    status = engine.compile_steps(mode, buckets)
    info(f"decode steps: {status['step']} ({status['reason']})")


def _first_metadata(caches: list):
    """The metadata of the first readable cache (which model and dtype to load); one file's error if none is."""
    from .state import read_metadata

    error = None
    for cache in caches:
        try:
            return read_metadata(cache)
        except VlcacheError as exc:
            error = error or exc
    if error is not None:
        raise error
    return None


def _model_named_by(meta) -> str:
    """The model a cache file names, when no --model or VLCACHE_MODEL says otherwise: a stranger's file must not
    decide what is downloaded, so only a local folder or a model already in the Hugging Face cache is taken."""
    from .model import MODEL_ENV_VAR, is_available_locally

    if not is_available_locally(meta.model):
        if os.environ.get(MODEL_ENV_VAR):
            return os.environ[MODEL_ENV_VAR]
        raise VlcacheError(
            f"the cache was made with {meta.model}, which is not on this machine; pass --model {meta.model} to "
            "download and use it (vlcache does not download what a cache file names on its own)"
        )
    info(f"using {meta.model}, the model the cache names")
    return meta.model


def _check_image_arg(path: str) -> None:
    # Fail before the model load (seconds to minutes) when the image cannot even be opened.
    from .images import load_image

    load_image(path)


def _check_media_arg(path: str) -> None:
    """An image opens; a video's container is probed (no frame decoded): before the model load."""
    from . import video

    if not video.is_video_path(path):
        return _check_image_arg(path)
    data, name = video.read_video_bytes(path)
    video.probe(data, name, video.MAX_DECODE_PIXELS)


def _version() -> str:
    from . import __version__

    return __version__


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command with the CLI's error policy: one line on stderr and a non-zero exit, never a traceback."""
    _log_to_stderr()
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except VlcacheError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except MemoryError:
        print("error: out of memory (try --max-pixels, --device cpu, or a smaller model)", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or an environment failure: still one line, with a way to see more
        if getattr(args, "debug", False):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "out of memory" in message.lower():
            print("error: out of memory (try --max-pixels, --device cpu, or a smaller model)", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {message} (rerun with --debug for details)", file=sys.stderr)
        return 1


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE, as `yes | head` ends


def _reader_gone() -> int:
    """stdout's reader went away (`vlcache inspect --json | head -c 100`): end quietly, as Unix tools do. Output
    still buffered goes nowhere, so the interpreter's last flush cannot fail with another error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests capture it)
        pass
    return EXIT_BROKEN_PIPE


def _log_to_stderr() -> None:
    """The library's notes (logger "vlcache") go to stderr as plain lines, like every other message."""
    import logging

    logger = logging.getLogger("vlcache")
    if not any(getattr(h, "_vlcache_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._vlcache_cli = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # after a command's name: that command's usage, which lists what it takes; before it: vlcache's
        named_at = argv.index(args.command) if args.command in argv else len(argv)
        before = any(flag in argv[:named_at] for flag in unknown)
        (parser if before else args.subparser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # serve --detach starts the same command line in the background
    problem = usage_problem(args)
    if problem:
        args.subparser.error(problem)  # exits 2 with the usage line, like any argument error
    return run_command(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
