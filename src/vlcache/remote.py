"""The CLI's commands through a running server (`--server URL` or $VLCACHE_SERVER): ask, chat, cache, and
`serve --detach` / `status` / `stop`. Nothing here imports torch or transformers; what is printed is what the
local commands print (the same Answer objects go through the same printers, in console.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import paths
from .client import Client, ServerError, server_url
from .console import (EachSource, UsageError, add_timings, chat_loop, check_output, check_prompt, info, print_answer, print_streamed,
                      read_prompts)
from .defaults import DEFAULT_SYSTEM_PROMPT
from .errors import VlcacheError

DETACH_WAIT_SECONDS = 900.0  # a first start may download and load a large model
STOP_WAIT_SECONDS = 30.0  # `vlcache stop` waits this long for the server to finish its requests and exit


def ask(args: argparse.Namespace, url: str) -> int:
    from .batch import expand_caches

    client = Client(url)
    prompts = read_prompts(args)
    for i, text in enumerate(prompts):
        check_prompt(text, "--prompt" if len(prompts) == 1 else f"prompt {i + 1}")
    _check_model(args, client)
    options = (args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.image:  # the uncached path: the server computes the state now, unless it holds it already
        start = time.perf_counter()
        made = client.cache([args.image], args.system_prompt or DEFAULT_SYSTEM_PROMPT)
        took = time.perf_counter() - start
        extra = {"state_lookup_s": took} if made.get("cached") else {"image_prefill_s": took}
        return _ask_state(client, made["id"], args.image, prompts, args, options, extra, single=len(prompts) == 1)
    caches = expand_caches(args.caches) if args.caches else []
    if not caches:
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        for text in prompts:
            messages = system + [{"role": "user", "content": text}]
            if len(prompts) == 1:
                print_streamed(client.stream(None, messages, *options), args)
            else:
                print_answer(client.ask(None, messages, *options), args, cache=None, prompt=text)
        return 0
    sources = EachSource(caches, client.state_for)
    for cache, key, seconds in sources:
        _ask_state(client, key, str(cache), prompts, args, options, {"state_lookup_s": seconds},
                   single=len(prompts) == 1 and len(caches) == 1)
    failed = sources.failed
    return 1 if failed else 0


def _ask_state(client: Client, key: str, label: str, prompts: list[str], args, options, extra: dict, single: bool) -> int:
    def one(text: str):
        return client.ask(key, [{"role": "user", "content": text}], *options)

    if single:
        print_streamed(client.stream(key, [{"role": "user", "content": prompts[0]}], *options), args, extra)
        return 0
    if args.sequential:
        answers = [one(text) for text in prompts]
    else:  # at once: the server batches them, as ask_many batches locally
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(prompts))) as pool:
            answers = list(pool.map(one, prompts))
    for text, answer in zip(prompts, answers):
        add_timings(answer, extra)
        print_answer(answer, args, cache=label, prompt=text)
    return 0


def chat(args: argparse.Namespace, url: str) -> int:
    """`vlcache chat` through a server: each turn sends the turns so far; the server continues its kept K/V."""
    client = Client(url)
    _check_model(args, client)
    key = client.state_for(args.cache)
    options = (args.max_new_tokens, args.temperature, args.top_p, args.seed)
    turns: list[dict] = []

    def ask_turn(text: str) -> None:
        nonlocal turns
        check_prompt(text, "the question")
        asked = turns + [{"role": "user", "content": text}]
        deltas: list = []
        print_streamed(_tee(client.stream(key, asked, *options), deltas), args)
        turns = asked + [{"role": "assistant", "content": deltas[-1].answer.text}]

    def reset() -> None:
        turns.clear()

    def save(target: str) -> None:
        raise VlcacheError("/save is not available through a server; run `vlcache chat` without --server to save")

    return chat_loop(ask_turn, reset, save)


def _tee(stream, into: list):
    for delta in stream:
        into.append(delta)
        yield delta


def cache(args: argparse.Namespace, url: str) -> int:
    """`vlcache cache ... --output PATH --server URL`: the media go to the server, its state comes back."""
    if args.output_dir is not None:
        raise UsageError("--server takes --output (one state); run without --server for --output-dir")
    if args.max_pixels or args.fps or args.max_frames:
        raise UsageError("--max-pixels, --fps and --max-frames are the server's settings (vlcache serve --fps ...); "
                         "drop them with --server")
    for source in args.images:
        if not Path(source).is_file():
            raise VlcacheError(f"not found: {source}")
    check_output(args.output, args.images)  # as locally: never over an input, only into a folder that exists
    client = Client(url)
    _check_model(args, client)
    output = Path(args.output)
    start = time.perf_counter()
    made = client.cache(args.images, args.system_prompt)
    path = client.download(made["id"], output, sources=args.images)
    frames = f"; {made['frames']} video frames" if made.get("frames") else ""
    info(f"cached {', '.join(args.images)} on {client.url}: {made['tokens']} tokens ({made['image_tokens']} media "
         f"tokens{frames}) in {time.perf_counter() - start:.2f}s -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _check_model(args: argparse.Namespace, client: Client) -> None:
    from .defaults import MODEL_ENV_VAR

    health = client.health()
    if getattr(args, "model", None) and health["model"] not in (args.model, paths.served_name(args.model)):
        raise VlcacheError(f"--model {args.model} is not the server's model ({health['model']} at {client.url}); drop "
                           "--model, or run without --server")
    named = os.environ.get(MODEL_ENV_VAR)
    if not getattr(args, "model", None) and named and named != health["model"]:  # never ignored in silence
        raise VlcacheError(f"{MODEL_ENV_VAR}={named} is not the server's model ({health['model']} at {client.url}); "
                           f"unset {MODEL_ENV_VAR}, or pass --server '' to load it here")
    # How the server's model computes is the server's: a flag for a model loaded here is refused, not ignored.
    quantize, served = getattr(args, "quantize", None), health.get("quantization", "none")
    if quantize and quantize != served:
        raise VlcacheError(f"--quantize {quantize}: the server at {client.url} runs its model with quantization {served}; "
                           "drop --quantize, or run without --server")
    if getattr(args, "threads", None) is not None:
        raise VlcacheError(f"--threads sets this process's threads, but the server at {client.url} computes the answer; "
                           "drop --threads (give it to `vlcache serve`), or run without --server")


# -- a server in the background ------------------------------------------------------------------------------

def detach(args: argparse.Namespace, argv: list[str]) -> int:
    """Start `vlcache serve` with the same arguments in the background; return once it answers /health."""
    record = paths.run_file()
    known = _recorded()
    if known and _alive(known["pid"]):
        raise VlcacheError(f"a vlcache server is already running (pid {known['pid']}, {known['url']}); `vlcache stop` first")
    record.parent.mkdir(parents=True, exist_ok=True)
    log = record.with_name("serve.log")
    command = [sys.executable, "-m", "vlcache", "serve", *[a for a in argv if a != "--detach"]]
    with open(log, "ab") as out:
        start_of_run = out.tell()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    url = f"http://{args.host}:{args.port}"
    record.write_text(json.dumps({"pid": process.pid, "url": url, "log": str(log)}))
    deadline = time.monotonic() + DETACH_WAIT_SECONDS
    echo = _LogEcho(log, start_of_run)  # the server's progress (loading, decode steps) shown while it starts
    while time.monotonic() < deadline:
        echo.lines()
        if process.poll() is not None:
            echo.lines()
            record.unlink(missing_ok=True)
            raise VlcacheError(f"the server exited (code {process.returncode}) before it answered; see {log}")
        try:
            health = Client(url, timeout=2).health()
            echo.lines()
            info(f"vlcache serve is up at {url} (pid {process.pid}, {health['model']}); log {log}")
            print(url)
            return 0
        except ServerError:
            time.sleep(0.5)
    raise VlcacheError(f"the server did not answer within {DETACH_WAIT_SECONDS:.0f} s; see {log}")


class _LogEcho:
    """The whole lines a starting server adds to its log, from `offset` on, copied to stderr."""

    def __init__(self, path: Path, offset: int):
        self.path, self.offset = path, offset

    def lines(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        for line in whole.decode("utf-8", "replace").splitlines():
            info(line)


def status(args: argparse.Namespace) -> int:
    known = _recorded()
    url = server_url(args.server) or (known or {}).get("url")
    if url is None:
        raise VlcacheError("no server given (--server URL or VLCACHE_SERVER) and none started with `vlcache serve --detach`")
    health = Client(url, timeout=5).health()
    if args.json:
        print(json.dumps({"url": url, **health}))
        return 0
    print(f"up: {url}  model {health['model']} ({health['family']}, {health['dtype']}, weights {health['fingerprint'][:12]}); "
          f"{health['hot_states']} states in memory ({health['hot_bytes'] / 2**20:.1f} MiB), "
          f"{health['running']} answering, {health['queued']} waiting")
    return 0


def stop(args: argparse.Namespace) -> int:
    """End the server `serve --detach` started (with --server: only if it is the one at that URL)."""
    known = _recorded()
    if not known or not _alive(known["pid"]):
        paths.run_file().unlink(missing_ok=True)
        raise VlcacheError("no server started with `vlcache serve --detach` is running")
    if args.server and not _same_server(args.server, known["url"]):
        raise VlcacheError(f"the server at {args.server} was not started by `vlcache serve --detach` here (that one is "
                           f"{known['url']}); vlcache stops only the server it started")
    os.kill(known["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while _alive(known["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(known["pid"]):  # still finishing what it had begun (an answer, an upload): not stopped yet
        raise VlcacheError(f"the server at {known['url']} (pid {known['pid']}) is still finishing its requests after "
                           f"{STOP_WAIT_SECONDS:.0f} s; it exits when they end (`vlcache stop` again to wait more, or kill {known['pid']})")
    paths.run_file().unlink(missing_ok=True)
    if args.json:
        print(json.dumps({"stopped": True, "url": known["url"], "pid": known["pid"]}))
    info(f"stopped the server at {known['url']} (pid {known['pid']})")
    return 0


def _same_server(given: str, recorded: str) -> bool:
    """URLs of one server, as the client spells them (http://127.0.0.1:8000, .../, .../v1 and 127.0.0.1:8000 agree)."""
    return Client(given).url.lower() == Client(recorded).url.lower()


def _recorded() -> dict | None:
    try:
        data = json.loads(paths.run_file().read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("url"), str) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is not alive
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True
