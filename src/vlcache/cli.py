"""The `vlcache` command line: the parser (every command's flags, in one place: the README's flag table is
checked against it), the checks that need several arguments, and the error policy. Each command's runner lives in
vlcache.commands, one module a command.

main() only parses arguments and calls the library; a VlcacheError becomes `error: <message>` and exit 1,
argument errors exit 2 (argparse), and no traceback is shown unless --debug is given.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from . import paths, quiet_upstream_notes
from .commands.ask import run_ask
from .commands.cache import run_cache
from .commands.chat import run_chat
from .commands.check import run_check
from .commands.demo import run_demo_model
from .commands.inspect import run_inspect
from .commands.serve import run_serve, run_status, run_stop
from .console import UsageError
from .defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SYSTEM_PROMPT
from .errors import VlcacheError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("none", "int8")  # vlcache.quantize.QUANTIZATIONS (not imported here: it imports torch)


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
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None, help="int8: the language model's linear "
                        "layers in int8, a model whose states are its own (default: the cache's, else none)")
    parser.add_argument("--threads", metavar="N", type=positive_int, default=None,
                        help="CPU threads torch computes with (default: what torch chooses, the cores it sees)")
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
    serve.add_argument("--disk-quota", metavar="SIZE", type=byte_size, default=byte_size("20GiB"),
                       help="bytes of computed states' files kept in --cache-dir, least recently used removed (default: 20GiB)")
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
    serve.add_argument("--kv-memory", metavar="SIZE", type=byte_size, default=None,
                       help="memory for the running requests' K/V blocks; a request that does not fit waits in the queue "
                            "(default: half the device's free memory at start)")
    serve.add_argument("--max-context", metavar="N", type=positive_int, default=None,
                       help="longest conversation (prompt and answer, in tokens) the server takes, and the positions "
                            "every compiled decode step attends over (a smaller one makes them faster) (default: the "
                            "model's context capped by what --kv-memory holds; compiled steps then cover 4096 positions "
                            "and longer rows step eagerly)")
    serve.add_argument("--prefill-chunk", metavar="N", type=positive_int, default=256,
                       help="most prefill tokens between two decode steps (default: 256)")
    serve.add_argument("--max-state-bytes", metavar="SIZE", type=byte_size, default=None,
                       help="largest cache file a client (--server) may upload (default: the model's K/V at its context length)")
    serve.add_argument("--max-uploads", metavar="N", type=positive_int, default=2,
                       help="uploads received at once; more get 429 (default: 2)")
    serve.add_argument("--max-downloads", metavar="N", type=positive_int, default=8,
                       help="state files sent at once, in pieces; more get 429 (default: 8)")
    serve.add_argument("--upload-quota", metavar="SIZE", type=byte_size, default=None,
                       help="bytes of uploaded cache files kept, least recently used removed (default: 4x --max-state-bytes)")
    serve.add_argument("--media-workers", metavar="N", type=positive_int, default=4,
                       help="threads that fetch and decode images and videos (default: 4)")
    serve.add_argument("--video-decode-pixels", metavar="N", type=positive_int, default=4_000_000_000,
                       help="frame pixels one request may decode, longer clips seek to keyframes (default: 4000000000)")
    serve.add_argument("--no-web", action="store_true", help="no chat page at / (the API alone)")
    serve.add_argument("--cors-origin", type=web_origin, default=None, metavar="ORIGIN",
                       help="one other origin whose pages may call the API, e.g. https://example.com (default: none)")
    serve.add_argument("--served-model-name", metavar="NAME", default=None,
                       help="the model's name in /v1/models, /health and answers (default: the hub id, or a local folder's name)")
    serve.add_argument("--share-all-states", action="store_true",
                       help="list, and answer by id, every state (chat completions' too: other clients' conversations "
                            "and photos); by default only those made through /v1/vlcache/cache and /v1/images")
    serve.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                       help="another name clients reach the server by (its Host header), repeatable; requests naming "
                            "none of loopback, --host and these are refused (default: none; '*' allows any)")
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

    demo = sub.add_parser("demo-model", help="write a tiny Qwen3-VL with RANDOM weights to try vlcache offline "
                                             "(its answers are noise)")
    demo.add_argument("folder", metavar="DIR", help="a new (or empty) folder to write it to")
    demo.set_defaults(run=run_demo_model)

    for p in sub.choices.values():  # flags every command takes after its name; its own usage on an error
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        p.set_defaults(subparser=p)
    return parser


VERBOSE_HELP = "also show what libraries print (transformers' loading bar and warnings)"


# -- checks across arguments, and the error policy ---------------------------------------------------------

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


def _version() -> str:
    from . import __version__

    return __version__


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command with the CLI's error policy: one line on stderr and a non-zero exit, never a traceback."""
    _log_to_stderr()
    _quiet_libraries(getattr(args, "verbose", False))
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


def _quiet_libraries(verbose: bool) -> None:
    """stderr is vlcache's lines: torch's note that no CUDA runtime is found (logged when torch.compile, or
    anything else, imports its C++ extension helper on a machine with /usr/local/cuda but no GPU) only with
    --verbose. Set before torch is imported: the note comes at import."""
    import logging

    if not verbose:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        quiet_upstream_notes()


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
