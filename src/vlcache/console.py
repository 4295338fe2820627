"""What the `vlcache` commands print and read, local or through a server: answers on stdout, notes on stderr,
questions from flags and files, the chat loop, and the checks on an output path made before any work.

cli.py (local commands) and remote.py (the same commands through `--server`) both use this module; it imports
neither of them, nor torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import storage
from .errors import VlcacheError


class UsageError(VlcacheError):
    """Arguments that parse but do not fit together: exit 2 like argparse's own errors."""


def info(message: str) -> None:
    """A note for the user: stderr, one line, at once."""
    print(message, file=sys.stderr, flush=True)


# -- questions -------------------------------------------------------------------------------------------------

def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (repeated) and the lines of --prompts-file, in that order."""
    found = list(args.prompts or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise VlcacheError(f"cannot read prompts file {args.prompts_file}: {exc}") from None
        found += [line.strip() for line in text.splitlines() if line.strip()]
    if not found:
        raise UsageError(f"no questions in {args.prompts_file}")
    return found


def check_prompt(text: str, where: str) -> None:
    """Before the model loads: text that cannot be a prompt (lone surrogates, vlcache's own marker)."""
    from .prompt import check_plain_text

    check_plain_text(text, where)


def read_schema(path: str) -> dict:
    """`--json-schema FILE`: a JSON object, read before any model loads."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise VlcacheError(f"cannot read JSON schema {path}: {exc}") from None
    except ValueError as exc:
        raise VlcacheError(f"--json-schema {path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise VlcacheError(f"--json-schema {path} must hold a JSON object (a JSON schema)")
    return schema


# -- an output file ---------------------------------------------------------------------------------------------

def check_output(output: str, inputs: Sequence[str]) -> None:
    """`cache --output`, before anything is computed: a file name (not a folder) in a folder that exists, and not
    one of the inputs. Local and `--server` runs make the same checks."""
    if storage.is_url(output):
        return  # written with one PUT at the end; inputs are local files
    path = Path(output)
    if path.is_dir():
        raise VlcacheError(f"--output is a folder: {path} (name a file, or use --output-dir for many caches)")
    parent = path.parent
    if not parent.is_dir():
        raise VlcacheError(f"--output's folder does not exist: {parent} (create it first, or name another path)")
    if path.exists() and any(path.resolve() == Path(p).resolve() for p in inputs):
        raise VlcacheError(f"--output {path} is an input; refusing to write over it")


# -- answers ----------------------------------------------------------------------------------------------------

class EachSource:
    """Opens several sources (state files, server keys) one by one: iterating gives (source, what open_one made of
    it, seconds it took) for each that opens. With one source its error is the run's error; with several, one that
    fails prints its `error:` line, counts in `failed`, and the others go on."""

    def __init__(self, sources: Sequence, open_one: Callable):
        self.sources, self.open_one, self.failed = list(sources), open_one, 0

    def __iter__(self) -> Iterator[tuple]:
        for source in self.sources:
            try:
                start = time.perf_counter()
                opened = self.open_one(source)
            except VlcacheError as exc:
                if len(self.sources) == 1:
                    raise
                print(f"error: {exc}", file=sys.stderr)
                self.failed += 1
                continue
            yield source, opened, time.perf_counter() - start


def print_streamed(stream, args: argparse.Namespace, extra: dict | None = None) -> None:
    """One answer: its text as it comes (stdout a terminal, or --stream), else whole (or as JSON); the report
    line on stderr."""
    live = not args.json and (args.stream or sys.stdout.isatty())
    answer = None
    for delta in stream:
        if live and delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        answer = delta.answer or answer
    add_timings(answer, extra)
    if live:
        print(flush=True)
    else:
        print_answer(answer, args)
    report(answer)


def add_timings(answer, extra: dict | None) -> None:
    """What the command measured around an answer (model load, state load, ...). With `image_prefill_s` the
    image was processed for this very answer (`ask --image`): none of its prompt tokens came from a cache."""
    answer.timings.update(extra or {})
    if "image_prefill_s" in answer.timings:
        answer.cached_tokens = 0


def print_answer(answer, args: argparse.Namespace, **fields) -> None:
    """An answer among several (fields: cache and prompt, printed as a header), or a lone one."""
    if args.json:
        print(json.dumps({**fields, **answer.to_dict()}), flush=True)
        return
    if fields:
        print(f"==> {fields['cache'] or '(text only)'} | {fields['prompt']} <==")
        print(answer.text, end="\n\n", flush=True)
    else:
        print(answer.text, flush=True)
    if fields:
        report(answer)


def print_json_answers(answers: list, args: argparse.Namespace, label: str | None, prompts: list[str], extra: dict,
                       single: bool) -> int:
    """Answers under --json-schema: one JSON line per image and question ({"cache", "prompt", "answer": the
    object}; a lone answer prints the bare object), the report on stderr. An answer cut short by
    --max-new-tokens before its JSON closed is an error line instead (exit 1)."""
    failed = 0
    for prompt_text, answer in zip(prompts, answers):
        add_timings(answer, extra)
        if args.json:
            print(json.dumps({"cache": label, "prompt": prompt_text, **answer.to_dict()}), flush=True)
            continue
        try:
            value = json.loads(answer.text)
        except ValueError:
            info(f"error: the answer to {prompt_text!r}{' about ' + label if label else ''} stopped after "
                 f"{len(answer.token_ids)} tokens before its JSON was complete; raise --max-new-tokens")
            failed += 1
            continue
        print(json.dumps(value if single else {"cache": label, "prompt": prompt_text, "answer": value}), flush=True)
        report(answer)
    return 1 if failed else 0


def report(answer) -> None:
    """`16 tokens; prompt 289 (280 cached); first token 0.123s, total 0.456s` on stderr. An answer whose media
    were processed for it (`ask --image`) says so instead of claiming cached tokens."""
    t = answer.timings
    if "image_prefill_s" in t:  # see add_timings
        where = f"none cached: the image was processed for this question in {t['image_prefill_s']:.3f}s"
    else:
        where = f"{answer.cached_tokens} cached"
    info(f"{len(answer.token_ids)} tokens; prompt {answer.prompt_tokens} ({where}); "
         f"first token {t['ttft_s']:.3f}s, total {t['total_s']:.3f}s")


# -- conversations ----------------------------------------------------------------------------------------------

def chat_loop(ask: Callable[[str], None], reset: Callable[[], None], save: Callable[[str], None]) -> int:
    """Read questions and /commands from stdin until it ends or /quit; a failing turn is reported and the
    loop goes on. Exit code 1 if any turn failed."""
    interactive = sys.stdin.isatty()
    if interactive:  # a person at a terminal: what they can type besides questions
        info("type a question and press Enter; /reset goes back to the cached image, /save PATH writes the "
             "conversation as a cache file, /quit ends")
    failed = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        try:
            if text == "/reset":
                reset()
                info("conversation reset to the cached image")
            elif text.startswith("/save"):
                target = text[len("/save"):].strip()
                if not target:
                    raise VlcacheError("/save needs a path: /save PATH")
                save(target)
            elif text.startswith("/"):
                raise VlcacheError(f"unknown command {text.split()[0]}; use /reset, /save PATH or /quit")
            else:
                ask(text)
        except BrokenPipeError:
            raise  # stdout's reader is gone: the command ends (quietly), not the turn
        except (VlcacheError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
