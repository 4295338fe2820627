"""`vlcache chat`: a conversation about a cached image, read from stdin."""

from __future__ import annotations

import argparse

from ..console import chat_loop, info, print_streamed
from .common import compile_steps, load_engine, model_named_by, one_command, server_url_of


def run_chat(args: argparse.Namespace) -> int:
    url = server_url_of(args)
    if url:
        from .. import remote

        return remote.chat(args, url)
    from ..conversation import Conversation
    from ..state import read_metadata

    meta = read_metadata(args.cache)
    engine = load_engine(args.model or model_named_by(meta), args, meta)
    compile_steps(engine, one_command(args), [1])
    chat = Conversation(engine, engine.load_state(args.cache))

    def save(target: str) -> None:
        path = chat.save(target)
        info(f"saved the conversation ({chat.turns} turns) to {path}")

    options = (args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return chat_loop(lambda text: print_streamed(chat.stream(text, *options), args), chat.reset, save)
