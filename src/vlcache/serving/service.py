"""The server's service: what the routes call. Admission (429 beyond the batch and the queue), states found or
computed for a request's images and videos (once for concurrent misses), kept conversations continued, and
generation jobs submitted to the scheduler.

A request's conversation is split after its last image or video: everything up to there is a state, keyed by
what decides its tokens (model fingerprint, the bytes of every image and video in it, the messages around
them, processor settings). A known state skips the vision encoder and the prefix prefill; only the rest of the
conversation is computed. Without one, the longest known state that ends after an earlier media part is
continued (a conversation that adds a second image to a cached first computes from the second image on).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import model as model_loading
from .. import prompt, toolcalls, video
from ..decode import kvpool
from ..engine import Engine
from ..errors import ImageError, VlcacheError
from .fetch import fetch_image_bytes
from .metrics import Metrics
from .options import ServeOptions
from .requests import APIError, ChatRequest, valid_id
from .scheduler import Job, Scheduler
from .store import UPLOADS, Continuation, StateStore
from .streaming import released, unless_disconnected
from .thumbs import Thumbnails


KEPT_SHARE = 0.5  # of --memory-budget: what kept conversations may hold however many states are in memory
ROW_COPIES = 2  # a row's K/V is held twice at most: in the prefill's batch, then in the running batch
FAILURE_SECONDS = 600.0  # a state that failed to compute (a broken or too costly video) is refused this long
_FAILURES_KEPT = 1024


@dataclass
class _Pending:
    """A state being computed, shared by every request that needs it."""

    stop: threading.Event  # set when no request waits any more: its decoding stops
    task: asyncio.Future | None = None
    waiters: int = 0


class Service:
    """What the routes call: state lookup and creation, and generation through the worker."""

    def __init__(self, engine: Engine, options: ServeOptions):
        self.engine = engine
        self.options = options = _resolved(options, engine, self._context_length(engine))
        self.store = StateStore(options.cache_dir, options.memory_budget, engine.fingerprint, engine.device,
                                adopt=engine.adopt, layout=engine.layout(), upload_quota=options.upload_quota,
                                share_all=options.share_all_states, disk_quota=options.disk_quota)
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, max_batch=options.max_batch, prefill_chunk=options.prefill_chunk, stats=self.metrics,
                                   kv_memory=options.kv_memory)
        if kvpool.reserves(engine.device, options.kv_memory):  # CUDA: the whole --kv-memory now, never grown (decode.kvpool)
            self.scheduler.reserve_pool()
        self.store.forget = self.scheduler.forget  # a deleted state's kept conversations go with it
        # Kept conversations' blocks and the states held in memory share --memory-budget, as before they were blocks.
        # The tree may always keep its share (KEPT_SHARE of the budget, less than the most recently used state
        # leaves: that one stays in memory), the states leaving room for what it keeps of it, and more while the
        # states leave more: else states filling the budget (any busy server) left the tree nothing, and every
        # finish evicted the conversations of every other client.
        share, budget = int(options.memory_budget * KEPT_SHARE), options.memory_budget
        self.scheduler.kept_budget = lambda: max(min(share, budget - self.store.newest_bytes),
                                                 budget - self.store.hot_bytes)
        self.store.others = lambda: min(self.scheduler.kept_bytes(), share)
        # Fetching and decoding media run on threads of their own: slow downloads or long videos never hold
        # the threads that text-only requests, uploads and lookups use.
        self.media_pool = concurrent.futures.ThreadPoolExecutor(options.media_workers, thread_name_prefix="vlcache-media")
        folder = self.store.folder
        self.thumbs = Thumbnails(None if folder.is_url else Path(folder.location) / "thumbs")  # the page's state list
        self._pending: dict[str, _Pending] = {}
        self._failed: OrderedDict[str, tuple[float, str]] = OrderedDict()  # state key -> (when, why)
        self._lock = threading.Lock()
        self.in_flight = 0  # chat requests accepted and not answered yet (event loop only)
        self.uploading = 0  # uploads being received (event loop only)
        self.downloading = 0  # state files being sent (event loop only)

    def close(self) -> None:
        self.scheduler.stop()
        self.media_pool.shutdown(wait=False, cancel_futures=True)

    def admit(self) -> None:
        """Count a request in flight, or refuse it (429) when the batch and the queue are full."""
        if self.in_flight >= self.options.max_batch + self.options.max_queue:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {self.in_flight} requests in flight; retry shortly",
                           kind="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    async def on_media_thread(self, function, *args):
        """`function(*args)` on the media pool (fetching, decoding), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.media_pool, functools.partial(function, *args))

    def keys(self, digests: list[tuple[str, str]], prefixes: list[list[dict]], salt: str | None,
             at: str | None = None) -> list[str]:
        """The key of the state ending after each media part: (kind, sha256) of the parts up to it, the
        messages it covers, the settings that decide their tokens (and `at`, a clock-reading template's instant)."""
        return [self.engine.state_key(digests[: j + 1], prefixes[j], self.options.media, salt, at) for j in range(len(digests))]

    async def state_for(self, sources: list[bytes], kinds: list[str], prefixes: list[list[dict]], salt: str | None = None):
        """The state for a conversation up to its last image or video: (key, state, cached tokens), computing
        and storing it on a miss, from the longest known state that ends after an earlier media part.

        `prefixes[j]` is the conversation up to and including media part j. Keys hash the encoded bytes:
        nothing is decoded unless a state must be computed. A computation that failed is remembered for
        FAILURE_SECONDS (the same bytes are refused at once); one that no request waits for any more stops.
        """
        digests = [(kind, hashlib.sha256(data).hexdigest()) for kind, data in zip(kinds, sources)]
        if salt is None and self.store.share_all:  # every unsalted state is listed: its images get thumbnails
            self.add_thumbnails(kinds, sources)
        # One instant for the keys and the state computed on a miss: a minute that turns between them would store
        # a state rendered at 12:35 under its 12:34 key.
        at = self.engine.pin_time()
        keys = self.keys(digests, prefixes, salt, at)
        key = keys[-1]
        state, source = await run_in_threadpool(self.store.get, key)
        self.metrics.states.labels(result=source).inc()
        if state is not None:
            return key, state, state.num_tokens
        with self._lock:  # concurrent misses on one conversation compute it once
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] < FAILURE_SECONDS:
                raise ImageError(failed[1])
            pending = self._pending.get(key)
            owner = pending is None or pending.stop.is_set()  # one being stopped: start again
            if owner:  # a task of its own: a client that hangs up does not cancel what others wait for
                pending = self._pending[key] = _Pending(stop=threading.Event())
                pending.task = asyncio.ensure_future(self._computed(key, sources, prefixes[-1], keys[:-1], pending, at))
                # Retrieved even when every waiter left: a stopped computation is not an unhandled error.
                pending.task.add_done_callback(lambda task: task.cancelled() or task.exception())
            pending.waiters += 1
        try:
            state = await asyncio.shield(pending.task)
        finally:
            with self._lock:
                pending.waiters -= 1
                if pending.waiters == 0 and not pending.task.done():
                    pending.stop.set()  # every client hung up
        self._gauges()
        # A request that waited for another's computation computed nothing itself.
        return key, state, state.metadata.reused_tokens if owner else state.num_tokens

    def add_thumbnails(self, kinds: list[str], sources: list[bytes]) -> None:
        """Thumbnails of a listed state's images, for the page's state list (off the event loop, on the media
        threads). Only for states that are listed: a chat completion's photo is another client's."""
        for kind, data in zip(kinds, sources):
            self.media_pool.submit(self.thumbs.add, kind, hashlib.sha256(data).hexdigest(), data,
                                   self.options.max_image_pixels)

    async def _computed(self, key: str, sources: list[bytes], messages: list[dict], earlier: list[str], pending: _Pending,
                        at: str | None = None):
        try:
            state = await self._compute(sources, messages, earlier, pending.stop, at)
            await run_in_threadpool(self.store.put, key, state)
            return state
        except ImageError as exc:
            if not pending.stop.is_set():  # the bytes are at fault, not a client that left
                with self._lock:
                    self._failed[key] = (time.monotonic(), str(exc))
                    while len(self._failed) > _FAILURES_KEPT:
                        self._failed.popitem(last=False)
            raise
        finally:
            with self._lock:
                if self._pending.get(key) is pending:
                    del self._pending[key]

    async def _compute(self, sources: list[bytes], messages: list[dict], earlier: list[str], stop: threading.Event,
                       at: str | None = None):
        """Compute a state on the model thread, continuing the longest known state among `earlier` keys."""
        base = None
        if self.engine.family.extends:
            for key in reversed(earlier):
                base, _ = await run_in_threadpool(self.store.get, key)
                if base is not None:
                    break
        # Decoding and the processor run on the media pool, beside the model thread: a long video does not
        # pause answers; its decoding is bounded (--video-decode-pixels) and stops when no one waits.
        prepared = await self.on_media_thread(self._prepare, sources, messages, video.DecodeBudget(self.options.video_decode_pixels, stop), at)
        chunk = self.options.prefill_chunk
        return await asyncio.wrap_future(self.scheduler.compute(lambda: self.engine.prefill_media_steps(prepared, chunk, base)))

    def _prepare(self, sources: list[bytes], messages: list[dict], budget: video.DecodeBudget, at: str | None = None):
        with video.limited(budget):
            prepared = self.engine.prepare_media(sources, messages, self.options.media, self.options.max_image_pixels, at)
        # The processor's grids gave the state's length: one the model cannot hold is refused before the vision
        # encoder runs (it would stall every running answer, and every question about it would be refused).
        tokens, context = int(prepared.inputs["input_ids"].shape[1]), self.context_length
        if tokens >= context:
            raise ImageError(f"the media make {tokens:,} tokens, beyond this model's context of {context:,}; send "
                             "smaller images or fewer frames")
        return prepared

    async def respond(self, request: Request, chat: ChatRequest, endpoint: str, stream, collect):
        """Admit a request (or 429), build and submit its job, then answer it: `stream(job, events, cached)` gives
        the server-sent events of a streaming request (in flight until the stream ends), `collect(...)` the body
        of any other. A client that hangs up while its media are fetched or decoded stops that work."""
        return await self.respond_choices(request, chat, endpoint, lambda choices, cached: stream(*choices[0], cached),
                                          lambda choices, cached: collect(*choices[0], cached))

    async def respond_choices(self, request: Request, chat: ChatRequest, endpoint: str, stream, collect):
        """respond for a request of chat.n choices: `stream` and `collect` take ([(job, events)], cached). The
        choices are rows over the one prefix the request's state lookup found, sampled with seeds seed + i."""
        self.admit()
        streaming = False
        try:
            try:
                job, cached, events = await unless_disconnected(request, self.prepare(chat))
            except ImageError as exc:
                raise APIError(400, str(exc), "messages") from None
            except VlcacheError as exc:
                raise APIError(400, str(exc)) from None
            choices = [(job, events)] + [self._sibling(job, i) for i in range(1, chat.n)]
            for choice, _ in choices:
                self.scheduler.submit(choice)
            self.metrics.requests.labels(endpoint=endpoint, status="200").inc()
            if chat.stream:
                streaming = True
                return StreamingResponse(released(stream(choices, cached), self.release), media_type="text/event-stream")
            return await collect(choices, cached)
        finally:
            if not streaming:
                self.release()

    def _sibling(self, job: Job, i: int) -> tuple[Job, asyncio.Queue]:
        """Choice i of a request: the first's prefix and prompt, its seed + i (as Engine.ask_many), its own events;
        only the first choice is kept as a continuation."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = job.options.seed
        options = dataclasses.replace(job.options, seed=None if seed is None else (seed + i + 2**63) % 2**64 - 2**63)
        return dataclasses.replace(job, options=options, keep=None, cancelled=threading.Event(), leader=job,
                                   emit=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))), events

    def _gauges(self) -> None:
        self.metrics.hot_bytes.set(self.store.hot_bytes)
        self.metrics.hot_states.set(self.store.hot_count)
        self.metrics.running.set(self.scheduler.running)
        self.metrics.queued.set(self.scheduler.queued)
        self.metrics.write_errors.set(self.store.write_errors)
        for kind, blocks in self.scheduler.kv_stats()["blocks"].items():
            for state in ("used", "free", "shared", "kept"):
                self.metrics.kv_blocks.labels(kind=kind, state=state).set(blocks.get(state, 0))

    async def prepare(self, request: ChatRequest) -> tuple[Job, int, asyncio.Queue]:
        """Build the generation job for a chat request; returns it with its cached-token count and event queue."""
        engine = self.engine
        try:
            await run_in_threadpool(prompt.check_messages, engine.processor, request.messages)  # long texts: off the loop
        except VlcacheError as exc:
            raise APIError(400, str(exc), "messages") from None
        await run_in_threadpool(self._check_options, request)
        if not request.media and request.state is None:
            new_ids = await run_in_threadpool(self._encode, request.messages, None)
            kv, history, delta, group, cached = engine.empty_kv(), new_ids[:, :0], 0, "", 0
            keep = None
        else:
            key, state, cached, covered, after = await self._base(request)
            new_ids = await run_in_threadpool(self._encode, request.messages, covered, state.metadata.template_time)
            kv, history, delta, group = state.kv, state.input_ids, int(state.rope_deltas.view(-1)[0]), key
            base = history.shape[1]
            cont, same = await self._continuation(request.messages[after + 1:], key, history, new_ids)
            if cont is not None:
                # The kept blocks of the first `same` tokens (the scheduler's prefix tree); rows with the same
                # run of ids are one group (admission counts its blocks once).
                ids = torch.cat([history, new_ids], dim=1)
                digest = hashlib.sha256(ids[0, :same].cpu().numpy().tobytes()).hexdigest()[:32]
                history, new_ids, group, cached = ids[:, :same], ids[:, same:], f"{key}:{digest}", same
            keep = None if engine.family.has_linear_layers else self._keeper(key)
        self._fit_context(request, history.shape[1] + new_ids.shape[1])
        self._fit_memory(history.shape[1] + new_ids.shape[1] + request.options.max_new_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        root = key if keep is not None else ""  # the tree's conversations under the state's key (never linear layers')
        job = Job(group=group, kv=kv, history=history, new_ids=new_ids, rope_delta=delta, options=request.options, emit=emit,
                  keep=keep, root=root, base=None if keep is None else base)
        return job, cached, events

    async def _base(self, request: ChatRequest):
        """The state a request continues: (key, state, cached tokens, the messages it covers, the index of the
        message where it ends). By id for vlcache's own clients (the request's turns then follow the state's
        conversation), else from the request's images and videos, found or computed."""
        if request.state is not None:
            key, state, cached, covered = await self._stored(request.state)
            request.messages = prompt.append_turns(covered, request.messages)
            return key, state, cached, covered, len(covered) - 1
        covered = [_prefix(request.messages, ref.at) for ref in request.media]
        sources = [await self.on_media_thread(fetch_image_bytes, ref.url, self.options) for ref in request.media]
        key, state, cached = await self.state_for(sources, [ref.kind for ref in request.media], covered, request.salt)
        return key, state, cached, covered[-1], request.media[-1].at[0]

    def _encode(self, messages: list[dict], prefix: list[dict] | None, at: str | None = None) -> torch.Tensor:
        """Token ids of the conversation after the image prefix (all of it without one), rendered at the state's
        pinned instant `at` where its template stamps the time; off the event loop. Its control tokens must be
        the template's alone: texts that write one out, however they are split or joined with what the template
        writes around them, are refused."""
        ids = self._ids(messages, prefix, at)
        control = prompt.control_ids(self.engine.processor)
        template = self._ids(prompt.without_texts(messages), None if prefix is None else prompt.without_texts(prefix), at)
        if _count(ids, control) != _count(template, control):
            raise APIError(400, "the messages' texts make up one of the model's control tokens; control tokens cannot "
                                "be typed in text", "messages")
        return ids.to(self.engine.device)

    def _ids(self, messages: list[dict], prefix: list[dict] | None, at: str | None) -> torch.Tensor:
        processor = self.engine.processor
        if prefix is None:
            return prompt.encode_text(processor, prompt.render(processor, messages, add_generation_prompt=True))
        try:
            return self.engine.ids_after(prefix, messages, at=at)
        except ValueError:
            raise APIError(400, "the conversation cannot be split at its image with this chat template", "messages") from None

    def _check_options(self, request: ChatRequest) -> None:
        """What the model decides about the options: token ids of logit_bias, tools its template takes, a schema
        that compiles (compiled here, off the event loop and the model thread, once per schema)."""
        vocab = self.engine.model.get_output_embeddings().weight.shape[0]
        bias = getattr(request.options, "logit_bias", None) or {}
        if any(token >= vocab for token in bias):
            raise APIError(400, f"'logit_bias' names a token id past this model's vocabulary ({vocab:,} tokens)", "logit_bias")
        if request.tools:
            problem = toolcalls.template_problem(self.engine.processor)
            if problem:
                raise APIError(400, f"unsupported parameter 'tools': {problem}", "tools")
        try:
            self.engine.check_options(request.options)
        except VlcacheError as exc:
            where = "tool_choice" if request.options.json_wrap else "response_format" if request.options.json_schema else None
            raise APIError(400, str(exc), where) from None

    def _fit_context(self, request: ChatRequest, prompt_tokens: int) -> None:
        """Refuse what the model cannot hold; the default answer length shrinks to fit."""
        context = self.context_length
        options = request.options
        if prompt_tokens >= context or (request.max_tokens_given and prompt_tokens + options.max_new_tokens > context):
            raise APIError(400, f"this model's maximum context length is {context:,} tokens; the messages have "
                                f"{prompt_tokens:,} and max_tokens asks for {options.max_new_tokens:,} more", "messages",
                           kind="invalid_request_error")
        options.max_new_tokens = min(options.max_new_tokens, context - prompt_tokens)

    def _fit_memory(self, tokens: int) -> None:
        """Refuse, before anything is allocated, a row the memory at hand cannot hold: its K/V in the batch and
        in the prefill's batch it moves from (media have their own check; a long text prompt needs this one, or
        its out-of-memory would come in the middle of a forward)."""
        need = ROW_COPIES * tokens * self.engine.kv_bytes_per_token()
        free = model_loading.available_memory(self.engine.device)
        if free is not None and need > free:
            raise APIError(400, f"the prompt is too large for the memory at hand: {tokens:,} tokens with the answer "
                                f"need about {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free; send a shorter "
                                "prompt or a smaller max_tokens", "messages")

    @property
    def context_length(self) -> int:
        return self._context_length(self.engine)

    @staticmethod
    def _context_length(engine: Engine) -> int:
        if engine.max_context:  # `serve --max-context` (or the model's context capped by --kv-memory)
            return engine.max_context
        return int(getattr(engine.model.config.get_text_config(), "max_position_embeddings", None) or 2**31)

    def shared_metadata(self, key: str):
        """The metadata of a state a client may name by id (a shared one, or an upload), else None."""
        if self.store.visible(key) or self.store.is_upload(key):
            return self.store.metadata(key)
        return None

    async def _stored(self, key: str):
        """A stored state by id: (key, state, its tokens, the messages it covers); 404 if the server has none (or
        holds it only for a chat completion: another client's conversation, found by its contents alone)."""
        state, source = None, "miss"
        if await run_in_threadpool(self.store.visible, valid_id(key, "state")):
            state, source = await run_in_threadpool(self.store.get, key)
        if state is None:  # an uploaded cache file, named by the hash of its bytes
            state, source = await run_in_threadpool(self.store.get_upload, key)
            key = f"{UPLOADS}:{key}"  # the store's own key for it: a next turn's continuation is kept under it
        self.metrics.states.labels(result=source).inc()
        if state is None:
            raise APIError(404, f"no state {key} on this server; upload its cache file first", "state")
        return key, state, state.num_tokens, state.metadata.messages

    async def _continuation(self, later: list[dict], key: str, history: torch.Tensor, new_ids: torch.Tensor):
        """A kept conversation this request continues, and how many of its tokens to reuse (None, 0 if none).
        `later`: the messages after the state's own.

        Only for requests with an answer after the image (single questions share the image state and batch
        together); never for linear-attention models (their state cannot be cut back to a shared run). The
        reuse ends at a message boundary, never inside a message: otherwise the cached-token count would tell
        a client, token by token, what another client wrote.
        """
        if self.engine.family.has_linear_layers or not any(msg["role"] == "assistant" for msg in later):
            return None, 0
        ids = torch.cat([history, new_ids], dim=1)
        cont, same = self.store.best_continuation(key, ids)
        if cont is None:
            return None, 0
        same = _message_boundary(ids[0].tolist(), min(same, ids.shape[1] - 1), history.shape[1], cont, self.engine.eos_ids)
        return (cont, same) if same > history.shape[1] else (None, 0)

    def _keeper(self, image_key: str):
        """Records a finished row, whose blocks the scheduler's prefix tree keeps, as a continuation of the image
        state (runs on the model thread)."""

        def keep(ids, node, answer_start):
            if node is not None:
                self.store.add_continuation(image_key, Continuation(input_ids=ids, node=node, answer_start=answer_start))
                self.store.make_room()  # the states give way to the tree's share, now fuller

        return keep


def _count(ids: torch.Tensor, wanted: frozenset[int]) -> int:
    return sum(1 for i in ids.view(-1).tolist() if i in wanted)


def _prefix(messages: list[dict], at: tuple[int, int]) -> list[dict]:
    """The conversation up to and including the media part at (message, part): its user turn left open."""
    m, p = at
    return messages[:m] + [{"role": "user", "content": messages[m]["content"][: p + 1]}]


def _message_boundary(ids: list[int], same: int, start: int, cont: Continuation, turn_ends: frozenset[int]) -> int:
    """The longest reuse up to `same` tokens that ends where a message ends: after an end-of-turn token, at the
    kept answer's start (its assistant header), or after the whole kept answer when the request's copy of it
    ends there too."""
    best = start
    for i in range(start, same):
        if ids[i] in turn_ends:
            best = i + 1
    if cont.answer_start <= same:
        best = max(best, cont.answer_start)
    if same == cont.num_tokens and same < len(ids) and ids[same] in turn_ends:
        best = same
    return best


def _resolved(options: ServeOptions, engine: Engine, context: int) -> ServeOptions:
    """The options with their defaults that depend on the model filled in: the largest upload is the model's
    K/V at its whole context length in float32 (the widest dtype a file may hold), and a little for its header
    and token ids; uploads kept are four of those."""
    if options.max_state_bytes is None:
        per_token = engine.kv_bytes_per_token() * 32 // torch.finfo(engine.dtype).bits
        options = dataclasses.replace(options, max_state_bytes=per_token * context + 32 * context + 16 * 2**20)
    if options.upload_quota is None:
        options = dataclasses.replace(options, upload_quota=4 * options.max_state_bytes)
    return options
