"""OpenAI chat completion bodies and chunks from answers: choices (n of them), logprobs, tool calls, usage.

A request of n choices runs as n jobs that share its prompt and prefix state (seeds seed + i, as Engine.ask_many
samples); usage counts the prompt once and every choice's tokens. Logprobs take OpenAI's shape: per token its
text, UTF-8 bytes and log-probability and the top alternatives (decode.sampling says which distribution: the
log-softmax after the logits rules and the temperature, a greedy row's at temperature 1).
"""

from __future__ import annotations

import asyncio
import json

from .. import toolcalls
from .requests import APIError, ChatRequest
from .streaming import _cancel_on_disconnect, answer_events


class TokenText:
    """A tokenizer's tokens as OpenAI writes them in logprobs: the text and the exact bytes of each."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and piece and all(c in self._byte_of for c in piece):
                raw = bytes(self._byte_of[c] for c in piece)  # byte-level BPE (Qwen): the token's own bytes
            else:
                raw = self.tokenizer.decode([token]).encode("utf-8")
            self._cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
            if len(self._cache) > 65536:
                self._cache.clear()
        return self._cache[token]

    def entry(self, logprobs) -> dict:
        """One ChatCompletionTokenLogprob from a decode TokenLogprobs."""
        text, raw = self(logprobs.token)
        top = []
        for token, value in logprobs.top:
            t, b = self(token)
            top.append({"token": t, "logprob": value, "bytes": b})
        return {"token": text, "logprob": logprobs.logprob, "bytes": raw, "top_logprobs": top}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet (Qwen's too): printable bytes stand for themselves, the others are moved
    past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def message(chat: ChatRequest, text: str, finish: str) -> tuple[dict, str]:
    """The assistant message of an answer (its tool calls parsed out where the request gave tools) and the finish
    reason ("tool_calls" when it called any)."""
    if not chat.tools:
        return {"role": "assistant", "content": text}, finish
    content, calls = toolcalls.parse(text)
    if not chat.parallel_tool_calls:
        calls = calls[:1]
    if not calls:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls" if finish == "stop" else finish


def usage(answers: list, cached: int) -> dict:
    completion = sum(len(a.token_ids) for a in answers)
    prompt = answers[0].prompt_tokens
    cached = min(cached, answers[0].cached_tokens)  # fewer when the kept conversation was evicted before the row ran
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(metrics, choices: list, chat: ChatRequest, started: float, request, token_text: TokenText) -> tuple[list, list]:
    """Every choice's (text, answer, finish) -> (OpenAI choices, answers)."""
    watcher = asyncio.create_task(_cancel_all_on_disconnect(request, [job for job, _ in choices]))
    try:
        done = await asyncio.gather(*(_one(metrics, job, events, chat.stop, started) for job, events in choices))
    finally:
        watcher.cancel()
    out = []
    for index, (text, answer, finish) in enumerate(done):
        msg, finish = message(chat, text, finish)
        logprobs = None
        if chat.options.logprobs is not None:
            kept = answer.logprobs[: _kept(answer, text, token_text.tokenizer)]
            logprobs = {"content": [token_text.entry(lp) for lp in kept], "refusal": None}
        out.append({"index": index, "message": msg, "finish_reason": finish, "logprobs": logprobs})
    return out, [answer for _, answer, _ in done]


def _kept(answer, text: str, tokenizer) -> int:
    """How many of an answer's tokens its returned text holds: all, unless a stop string cut it (then the
    tokens up to the one that reaches the cut)."""
    if text == answer.text:
        return len(answer.token_ids)
    for k in range(len(answer.token_ids)):
        if len(tokenizer.decode(answer.token_ids[: k + 1], skip_special_tokens=True)) >= len(text):
            return k + 1
    return len(answer.token_ids)


async def _one(metrics, job, events, stop, started):
    pieces = []
    async for event in answer_events(metrics, job, events, stop, started):
        if event[0] == "text":
            pieces.append(event[1])
        elif event[0] == "done":
            _, answer, finish, stopped = event
            return ("".join(pieces) if stopped else answer.text), answer, finish
    raise APIError(500, "the answer ended without its end", kind="server_error")


async def _cancel_all_on_disconnect(request, jobs) -> None:
    await asyncio.gather(*(_cancel_on_disconnect(request, job) for job in jobs))


async def stream(metrics, choices: list, chat: ChatRequest, started: float, head: dict, token_text: TokenText, timings,
                 cached: int):
    """Server-sent events of every choice, interleaved as they come: role, content (with its logprobs), tool calls,
    the finish, then usage where asked for."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, job, events):
        try:
            async for event in answer_events(metrics, job, events, chat.stop, started):
                await queue.put((index, event))
        except APIError as exc:
            await queue.put((index, ("error", exc)))
        await queue.put((index, None))

    def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    tasks = [asyncio.create_task(pump(i, job, events)) for i, (job, events) in enumerate(choices)]
    try:
        for index in range(len(choices)):
            yield chunk(index, {"role": "assistant", "content": ""})
        pending = [[] for _ in choices]  # logprobs waiting for their token's text
        calls = [toolcalls.CallStream() if chat.tools else None for _ in choices]
        called = [False] * len(choices)
        answers = [None] * len(choices)
        open_choices = len(choices)
        while open_choices:
            index, event = await queue.get()
            if event is None:
                open_choices -= 1
                continue
            kind = event[0]
            if kind == "error":
                raise event[1]
            if kind == "logprobs":
                pending[index].append(token_text.entry(event[1]))
                continue
            if kind == "text":
                for out in _pieces(calls[index], event[1], chat.parallel_tool_calls or not called[index]):
                    yield _piece_chunk(chunk, index, out, pending, called)
                continue
            _, answer, finish, _ = event
            answers[index] = answer
            if calls[index] is not None:
                for out in calls[index].flush():
                    yield _piece_chunk(chunk, index, out, pending, called)
            if pending[index]:  # tokens whose text came out empty (an end-of-turn token)
                yield chunk(index, {}, logprobs={"content": pending[index], "refusal": None})
                pending[index] = []
            if called[index] and finish == "stop":
                finish = "tool_calls"
            yield f"data: {json.dumps({**head, 'choices': [{'index': index, 'delta': {}, 'finish_reason': finish, 'logprobs': None}], 'timings': timings(answer)})}\n\n"
        if chat.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(answers, cached)})}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind, 'param': None, 'code': None}})}\n\n"
    finally:
        for job, _ in choices:
            job.cancelled.set()  # a client that went away frees its rows
        for task in tasks:
            task.cancel()


def _pieces(calls, text: str, calls_wanted: bool):
    if calls is None:
        return [("text", text)]
    return [out for out in calls.feed(text) if out[0] == "text" or calls_wanted]


def _piece_chunk(chunk, index, out, pending, called) -> str:
    kind, value = out
    logprobs = {"content": pending[index], "refusal": None} if pending[index] else None
    pending[index] = []
    if kind == "text":
        return chunk(index, {"content": value}, logprobs=logprobs)
    called[index] = True
    return chunk(index, {"tool_calls": [value]}, logprobs=logprobs)

