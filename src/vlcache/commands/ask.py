"""`vlcache ask` (and the guide's run_smart_prompt.py): questions about cache files, an image, or text alone."""

from __future__ import annotations

import argparse
import time

from ..console import (EachSource, UsageError, add_timings, check_prompt, print_answer, print_json_answers, print_streamed, read_prompts,
                       read_schema)
from ..defaults import DEFAULT_SYSTEM_PROMPT
from .common import (check_media_arg, compile_steps, first_metadata, last, load_engine, model_named_by, one_command,
                     server_url_of)


def run_ask(args: argparse.Namespace) -> int:
    from ..batch import expand_caches

    url = server_url_of(args)
    schema = read_schema(args.json_schema) if args.json_schema else None
    if url:
        from .. import remote

        if schema is not None:
            raise UsageError("--json-schema answers in this process; leave out --server (and $VLCACHE_SERVER)")
        return remote.ask(args, url)
    prompts = read_prompts(args)
    for i, text in enumerate(prompts):
        check_prompt(text, "--prompt" if len(prompts) == 1 else f"prompt {i + 1}")
    caches = expand_caches(args.caches) if args.caches else []
    meta = first_metadata(caches)
    model = args.model or (model_named_by(meta) if meta else None)
    if args.image:
        check_media_arg(args.image)
    start = time.perf_counter()
    engine = load_engine(model, args, meta)
    compile_steps(engine, one_command(args), [1])
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
    sources = EachSource(caches, engine.load_state)
    failed = 0
    for cache, state, seconds in sources:
        extra["state_load_s"] = seconds
        # An answer --json-schema could not complete (cut by --max-new-tokens) fails the run, after the others.
        failed += bool(_ask_state(engine, state, str(cache), prompts, args, extra,
                                  single=len(prompts) == 1 and len(caches) == 1))
    failed += sources.failed
    return 1 if failed else 0


def _ask_state(engine, state, label: str, prompts: list[str], args: argparse.Namespace, extra: dict, single: bool) -> int:
    """One question about one source prints (and may stream) the bare answer; otherwise one per pair."""
    options = (args.max_new_tokens, args.temperature, args.top_p, args.seed)
    generation = getattr(args, "generation", {})
    if generation:
        answers = [last(engine.stream(state, p, *options, **generation)).answer for p in prompts] if args.sequential \
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
        answers = [last(engine.stream(None, p, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                      system_prompt=args.system_prompt, **generation)).answer for p in prompts]
        return print_json_answers(answers, args, None, prompts, extra, len(prompts) == 1)
    for prompt_text in prompts:
        stream = engine.stream(None, prompt_text, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                               system_prompt=args.system_prompt)
        if len(prompts) == 1:
            print_streamed(stream, args, extra)
        else:
            print_answer(last(stream).answer, args, cache=None, prompt=prompt_text)
    return 0
