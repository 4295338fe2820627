"""The `vlcache` command: cache, ask, inspect. Answers go to stdout, everything else to stderr.

main() only parses arguments and calls the library; a VlcacheError becomes `error: <message>` and exit 1,
argument errors exit 2 (argparse), and no traceback is shown unless --debug is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import VlcacheError

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant analyzing an image."  # the guide's default
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")


# -- argument types: validated at parse time ---------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto-detect)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the checkpoint's)")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help=f'default: "{DEFAULT_SYSTEM_PROMPT}"')
    add_model_arguments(parser, "model id or local folder (default: $VLCACHE_MODEL or Qwen/Qwen3-VL-2B-Instruct)")
    parser.add_argument("--max-pixels", type=positive_int, default=None, help="downscale larger images to this many pixels")


def add_ask_arguments(parser: argparse.ArgumentParser, max_tokens_flags: tuple[str, ...]) -> None:
    parser.add_argument("--cache", default=None, help="cache file from `vlcache cache` (omit for a text-only chat)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument(*max_tokens_flags, dest="max_new_tokens", type=positive_int, default=128, help="default: 128")
    parser.add_argument("--temperature", type=non_negative_float, default=None, help="0 = greedy (default: the model's generation config)")
    parser.add_argument("--top-p", type=probability, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, for repeatable answers")
    parser.add_argument("--system-prompt", default=None, help="system turn for a text-only chat (ignored with --cache)")
    add_model_arguments(parser, "model id or local folder (default: the model recorded in the cache)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come (default when stdout is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlcache", description="Process an image once, ask it many questions.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"vlcache {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="process an image and save the model state after it")
    cache.add_argument("image", help="image file (any common format)")
    cache.add_argument("--output", "-o", required=True, help="cache file to write (safetensors, any name)")
    add_cache_arguments(cache)
    cache.set_defaults(run=run_cache)

    ask = sub.add_parser("ask", help="answer a prompt from a cache file (or text-only without --cache)")
    add_ask_arguments(ask, ("--max-new-tokens", "--max_new_tokens"))
    ask.set_defaults(run=run_ask)

    inspect = sub.add_parser("inspect", help="show what a cache file holds")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=run_inspect)

    for p in (cache, ask, inspect):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


# -- commands ----------------------------------------------------------------------------------------------

def run_cache(args: argparse.Namespace) -> int:
    _check_image_arg(args.image)
    engine = _load_engine(args.model, args.device, args.dtype or "auto")
    start = time.perf_counter()
    state = engine.cache_image(args.image, system_prompt=args.system_prompt, max_pixels=args.max_pixels)
    path = state.save(args.output)
    _info(
        f"cached {args.image}: {state.num_tokens} tokens ({state.metadata.image_tokens} image tokens) in "
        f"{time.perf_counter() - start:.2f}s -> {path} ({path.stat().st_size / 2**20:.1f} MiB)"
    )
    return 0


def run_ask(args: argparse.Namespace) -> int:
    from .state import read_metadata

    meta = read_metadata(args.cache) if args.cache else None
    model = args.model or (meta.model if meta else None)
    dtype = args.dtype or (meta.dtype if meta else "auto")
    engine = _load_engine(model, args.device, dtype)
    state = engine.load_state(args.cache) if args.cache else None
    stream = engine.stream(
        state, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
        system_prompt=None if state else args.system_prompt,
    )
    live = not args.json and (args.stream or sys.stdout.isatty())
    answer = None
    for delta in stream:
        if live and delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        answer = delta.answer or answer
    if args.json:
        print(json.dumps(answer.to_dict()))
    elif live:
        print()
    else:
        print(answer.text)
    t = answer.timings
    _info(
        f"{len(answer.token_ids)} tokens; prompt {answer.prompt_tokens} ({answer.cached_tokens} cached); "
        f"first token {t['ttft_s']:.3f}s, total {t['total_s']:.3f}s"
    )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from .state import read_header, read_metadata

    header = read_header(args.path)
    meta = read_metadata(args.path)
    size = Path(args.path).stat().st_size
    kv_bytes = sum(
        t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items() if name.startswith("layers.")
    )
    info = {"path": str(args.path), "file_bytes": size, "kv_bytes": kv_bytes, **meta.__dict__}
    if args.json:
        print(json.dumps(info))
        return 0
    w, h = meta.image_size
    lines = [
        f"file:          {args.path} ({size:,} bytes; KV {kv_bytes:,} bytes)",
        f"model:         {meta.model}",
        f"fingerprint:   {meta.fingerprint}",
        f"dtype:         {meta.dtype}",
        f"system prompt: {meta.system_prompt!r}",
        f"image:         {meta.image_path or '(bytes)'} ({w}x{h}, sha256 {meta.image_sha256[:16]}...)",
        f"max pixels:    {meta.max_pixels or 'processor default'}",
        f"tokens:        {meta.prefix_tokens} ({meta.image_tokens} image tokens)",
        f"created:       {meta.created}",
        f"versions:      " + ", ".join(f"{k} {v}" for k, v in meta.versions.items()),
        f"format:        vlcache {meta.format_version}",
    ]
    print("\n".join(lines))
    return 0


# -- plumbing ----------------------------------------------------------------------------------------------

def _load_engine(model: str | None, device: str, dtype: str):
    from .engine import Engine
    from .model import default_model

    name = model or default_model()
    _info(f"loading {name} ({device}, {dtype})...")
    start = time.perf_counter()
    engine = Engine.load(name, device=device, dtype=dtype)
    _info(f"loaded in {time.perf_counter() - start:.1f}s on {engine.device} as {str(engine.dtype).removeprefix('torch.')}")
    return engine


def _check_image_arg(path: str) -> None:
    # Fail before the model load (seconds to minutes) when the image cannot even be opened.
    from .images import load_image

    load_image(path)


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version() -> str:
    from . import __version__

    return __version__


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command with the CLI's error policy: one line on stderr and a non-zero exit, never a traceback."""
    try:
        return run(args)
    except VlcacheError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
