"""An answer's events as the routes use them: text pieces with stop strings applied, the whole answer at the
end, a row cancelled when its client hangs up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import Request

from .metrics import Metrics
from .requests import APIError
from .scheduler import Job


class _StopText:
    """Applies stop strings to streamed text: what may be shown now, and whether a stop string was reached."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        for stop in self.stops:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.hit = self.text[:at], True
        if self.hit:
            return self._release(len(self.text))
        hold = max((len(s) - 1 for s in self.stops), default=0)  # a stop string may be starting at the end
        return self._release(max(self.sent, len(self.text) - hold))

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out


async def answer_events(metrics: Metrics, job: Job, events: asyncio.Queue, stop: list[str], started: float):
    """Yield ("text", piece) (and ("logprobs", TokenLogprobs) before a token's text where asked for) then ("done",
    answer, finish_reason, stopped); stop strings end a job early."""
    stops = _StopText(stop)
    first = True
    while True:
        kind, value = await events.get()
        if kind == "error":
            raise APIError(500, value, kind="server_error")
        if kind == "logprobs":  # a token's, sent before its text (options.logprobs)
            if not stops.hit:
                yield "logprobs", value
            continue
        if kind == "delta":
            if first:
                metrics.ttft.observe(time.perf_counter() - started)
                first = False
            if not stops.hit:
                piece = stops.feed(value)
                if stops.hit:
                    job.cancelled.set()
                if piece:
                    yield "text", piece
            continue
        tail = stops.flush()
        if tail:
            yield "text", tail
        yield "done", value, "stop" if stops.hit else value.finish_reason, stops.hit
        return


async def collect_answer(metrics: Metrics, job: Job, events: asyncio.Queue, stop: list[str], started: float, request: Request):
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        pieces = []
        async for event in answer_events(metrics, job, events, stop, started):
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "logprobs":
                continue  # the answer carries them all
            elif not event[3]:  # no stop string cut it: the whole answer's own decoding
                # (streamed pieces can disagree with it where byte-fallback tokens decode differently in context)
                return event[1].text, event[1], event[2]
            else:
                return "".join(pieces), event[1], event[2]
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(request: Request, job: Job, every: float = 0.1) -> None:
    """A client that hangs up on a non-streaming request frees its row (streams notice on their own)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(every)


async def released(stream, release: Callable[[], None]):
    """`stream`'s chunks; `release()` once it ends, however it ends (a client that hangs up included)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        release()


async def unless_disconnected(request: Request, awaitable, every: float = 0.1):
    """`awaitable`'s result, or, when the client hangs up first, the awaitable cancelled (what it started for
    this client alone stops) and a 400 that no one reads."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(400, "the client disconnected")
    finally:
        if not task.done():
            task.cancel()
