"""The model thread's step scheduler: continuous batching.

One thread owns the model. Each iteration it
1. takes what arrived, first come first served: questions wait for a row of the batch (at most max_batch),
   image states to compute queue as tasks;
2. ends rows whose client went away or hit a stop string;
3. does one unit of prefill work, at most `prefill_chunk` tokens: the next piece of an image state (the
   vision encoder on one image or video, the prefix prefill in pieces, where the family can split them), or the
   questions of rows joining the batch (several short ones together, a long one in pieces); the two take
   turns when both wait;
4. runs one decode step for every running row; finished rows leave at once and free their row.

Admission by memory (`kv_memory` bytes, `vlcache serve --kv-memory`): a row starts only when the K/V blocks it
may need at most (its own tokens up to max_tokens, and its state's blocks unless a running row holds that state
already) fit beside what the rows already started may need; otherwise it waits in the queue, first come first
served. So the pool never runs out of blocks; a request that could not fit even alone fails at once.

Kept conversations (a finished row's blocks) stay in a prefix tree keyed by token ids (decode.radix): a later
row whose history the tree holds references those blocks instead of writing its state again; the tree gives
way, least recently used first, when the pool is at its bound or past `kept_budget` (the server's: its share
of --memory-budget, or what its states leave if more), never freeing a block a row uses.

Rows about different image states (and text-only rows) share one batch: each attends to its own prefix,
referenced through its block table (one copy of a state in the K/V blocks for all its rows, vlcache.decode).
So a new question waits at most one prefill unit and one decode step before its own prefill starts, never for
someone else's answer to end.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .. import decode
from ..decode.blocks import PoolFull, blocks_for
from ..decode.kvpool import kind_name, serving_pool
from ..decode.radix import RadixTree
from ..engine import Answer, Engine, GenerationOptions, TextAssembler, _Timing

log = logging.getLogger("vlcache")


@dataclass
class Job:
    # The prefix state per layer ([1, kv_heads, n, D] K/V, or a linear layer's state), or a function that makes
    # it: called on the model thread when the row's prefill starts, so that queued rows hold no copies.
    kv: list | Callable[[], list]
    history: torch.Tensor  # the prefix ids [1, n]
    new_ids: torch.Tensor  # [1, m]
    rope_delta: int
    options: GenerationOptions
    emit: Callable[[str, object], None]  # ("delta", text) and finally ("done", Answer) or ("error", message)
    group: str = ""  # jobs with the same group continue from the same prefix: the state key, "" for text-only
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # Called with the row's ids (all but the answer's last token), the tree node that keeps their blocks
    # (decode.radix: None when `root` is empty) and the number of tokens before the answer, to continue from.
    keep: Callable[[torch.Tensor, object, int], None] | None = None
    # The key of the state the row continues, under which its conversation is kept in the prefix tree (and its
    # history looked up there before `kv` is written again): "" keeps and reuses nothing.
    root: str = ""
    # Tokens of the state `kv` gives (None: all of `history`). When `history` is longer (a kept conversation's
    # tokens after the state), they are read from the prefix tree; as far as it no longer holds them (evicted
    # meanwhile), the row prefills them again after the state.
    base: int | None = None
    # Choice i > 0 of a request of n choices: the job of choice 0. Prefilled with it, such a row takes a copy of
    # its state after the prompt instead of running the prompt again (one prefill for the n choices).
    leader: "Job | None" = None


@dataclass(eq=False)
class _Row:
    job: Job
    prefix: decode.Prefix | None  # set when its prefill starts
    sampling: decode.SamplingParams
    text: TextAssembler
    fed: int = 0  # new ids prefilled so far
    first: float | None = None
    reserved: int = 0  # bytes of K/V blocks set aside for its own tokens (admission by memory)
    reserved_key: str = ""  # the group its state's bytes are counted in (its own for a text-only row)
    constraint: object = None  # the row's grammar (decode.TokenConstraint), or None
    ended: bool = False  # the last sample ended the row (end of sequence, a rule, its grammar)
    logprobs: list = field(default_factory=list)  # per token, when the options ask for them

    @property
    def remaining(self) -> int:
        return self.job.new_ids.shape[1] - self.fed


@dataclass(eq=False)
class _Task:
    make: Callable  # () -> a generator of units of work that returns the result
    future: Future
    steps: object = None


@dataclass(eq=False)
class _Prefill:
    rows: list[_Row]
    batch: decode.Batch
    followers: list[_Row] = field(default_factory=list)  # choices whose leader is among the rows: not prefilled
    settled: set = field(default_factory=set)  # rows answered, finished, running or queued again: not failed with it


class Stats:
    """What the scheduler reports (the server turns these into Prometheus metrics)."""

    def queue_wait(self, seconds: float) -> None: ...

    def batch_size(self, rows: int) -> None: ...


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 16, prefill_chunk: int = 256, stats: Stats | None = None,
                 kv_memory: int | None = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be at least 1")
        if kv_memory is not None and kv_memory < 1:
            raise ValueError("kv_memory must be at least 1 byte")
        self.kv_memory = kv_memory  # bytes of K/V blocks at most (None: unbounded)
        self._reserved = 0  # bytes the started rows may take at most (their own tokens, their states' blocks)
        self._groups: dict[str, list[int]] = {}  # state group -> [bytes of its blocks, rows started on it]
        self.engine = engine
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.stats = stats or Stats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Row] = deque()
        self._tasks: deque[_Task] = deque()
        self._prefill: _Prefill | None = None
        self._running: list[_Row] = []  # row i sits in slot i of self._batch
        self._batch: decode.Batch | None = None
        # The K/V blocks of every batch here (the running one and the one prefilling joining rows): a state is
        # written once for all its rows, and a row moves into the running batch by reference.
        self._pool: decode.KVPool | None = None
        self._prefixes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # group -> Prefix in use
        # Kept conversations: chains of the pool's blocks in a prefix tree keyed by token ids (one copy each).
        self._radix: RadixTree | None = None
        # Bytes the tree may keep (None: only --kv-memory bounds it): the server gives what its state store's
        # budget leaves, as kept conversations' copies counted against it before they were blocks.
        self.kept_budget: Callable[[], int | None] = lambda: None
        self._tasks_turn = False
        # Work taken and requests arrived, counted: a timing on another thread (decode.probe's background `auto`
        # decision) that sees it unchanged and the scheduler idle before and after ran undisturbed by serving.
        # (Increments from two threads may lose one another; the count still changes, which is all it is read for.)
        self.activity = 0
        # The model thread between taking work and waiting for more: a request it is starting has left the queues
        # and is not yet prefilling (its state made, its prefix written), so the queues alone would read idle.
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="vlcache-model", daemon=True)
        self._thread.start()

    # -- called from other threads ---------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.activity += 1
        self._inbox.put(job)

    def compute(self, make: Callable) -> Future:
        """Run `make()` (a generator of units of work that returns a result, e.g. Engine.prefill_media_steps)
        on the model thread, between decode steps; the Future carries the result."""
        future: Future = Future()
        self.activity += 1
        self._inbox.put(_Task(make, future))
        return future

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the model thread as one unit."""

        def steps():
            return fn()
            yield  # noqa: unreachable - makes this a generator

        return self.compute(steps)

    def reserve_pool(self) -> None:
        """Make the K/V pool now (a reserved one, on CUDA, takes its whole bound: memory the device cannot give
        shows at start, not at the first request)."""
        self.call(lambda: self._layout().ensure()).result()

    def forget(self, root: str) -> None:
        """Drop the conversations kept under a state's key (it was deleted); rows using them go on."""
        self.call(lambda: self._radix.drop(root) if self._radix is not None else None)

    def stop(self) -> None:
        self._inbox.put(None)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        """No running row, no queued question or task, nothing arrived that the model thread has not taken, and
        the model thread waiting for work."""
        return not (self._busy or self._running or self._waiting or self._tasks or self._prefill) and self._inbox.empty()

    @property
    def queued(self) -> int:
        """Questions admitted but not decoding yet (waiting for a row, or being prefilled)."""
        prefill = self._prefill
        return len(self._waiting) + (len(prefill.rows) if prefill else 0)

    # -- the model thread ------------------------------------------------------------------------------------

    @torch.inference_mode()  # every tensor the batch keeps is made and updated here
    def _run(self) -> None:
        while True:
            idle = not (self._running or self._waiting or self._tasks or self._prefill)
            if idle:
                self._busy = False
            if not self._take(block=idle):
                return
            self._busy = True  # before the count: a timing that reads the count after it sees busy
            self.activity += 1
            try:
                self._drop_cancelled()
                try:
                    self._prefill_unit()
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the prefill's own batch, its rows alone
                    log.exception("prefill failed")
                    self._fail_prefill(f"generation failed: {type(exc).__name__}: {exc}")
                if self._running:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - a failed forward: its rows get an error, the server goes on
                log.exception("generation failed")
                self._fail_rows(f"generation failed: {type(exc).__name__}: {exc}")

    def _take(self, block: bool) -> bool:
        """Move what arrived into the queues; False when asked to stop."""
        items = []
        if block:
            items.append(self._inbox.get())
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is None:
                return False
            if isinstance(item, _Task):
                self._tasks.append(item)
                continue
            try:
                self._waiting.append(self._row(item))
            except Exception as exc:  # noqa: BLE001 - options no sampler takes: this job fails, the thread goes on
                item.emit("error", f"cannot start generation: {type(exc).__name__}: {exc}")
        return True

    def _row(self, job: Job) -> _Row:
        job.options.check()
        return _Row(job, None, self.engine.sampling(job.options), TextAssembler(self.engine.processor.tokenizer),
                    constraint=self.engine.constraint(job.options))

    def _prefix(self, job: Job) -> decode.Prefix:
        """One Prefix object per state in use: the blocks the prefix tree keeps of the job's history, else its
        state written into blocks (a state made on demand, job.kv a function, is made once). Its tokens may be
        fewer than the history's (the tree no longer holds all of it): the row then prefills the rest."""
        prefix = self._prefixes.get(job.group)
        if prefix is None:
            prefix = self._kept_prefix(job)
            if prefix is None:
                kv = job.kv() if callable(job.kv) else job.kv
                tokens = job.history.shape[1] if job.base is None else job.base
                prefix = decode.Prefix(kv=kv, tokens=tokens, rope_delta=job.rope_delta)
            self._prefixes[job.group] = prefix
        return prefix

    def _kept_prefix(self, job: Job) -> decode.Prefix | None:
        """The job's history as far as the prefix tree holds it (at least its state's tokens), or None."""
        if not job.root or self._radix is None:
            return None
        want = job.history.shape[1]
        base = want if job.base is None else job.base
        got, chains, _ = self._radix.match(job.root, job.history[0].tolist())
        tokens = min(got, want)
        if tokens == 0 or tokens < base:  # the state's own tokens come with its media: only the state has them
            return None
        blocks = {kind: chain[: blocks_for(tokens, self._pool.block_size)] for kind, chain in chains.items()}
        return decode.Prefix(kv=[(None, None)] * len(self._pool.shapes), tokens=tokens, rope_delta=job.rope_delta,
                             blocks=blocks)

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._waiting if r.job.cancelled.is_set()]:
            self._waiting.remove(row)
            self._finish(row)
        for slot in reversed(range(len(self._running))):
            if self._running[slot].job.cancelled.is_set():
                self._finish(self._running[slot])
                self._leave(slot)

    # -- prefill ---------------------------------------------------------------------------------------------

    def _prefill_unit(self) -> None:
        self._refuse_too_large()
        rows_ready = self._prefill is not None or (self._waiting and len(self._running) < self.max_batch
                                                   and self._fits(self._waiting[0]))
        if self._tasks and (self._tasks_turn or not rows_ready):
            self._task_unit()
            self._tasks_turn = False
        elif rows_ready:
            self._question_unit()
            self._tasks_turn = True

    def _task_unit(self) -> None:
        task = self._tasks[0]
        try:
            if task.steps is None:
                if not task.future.set_running_or_notify_cancel():
                    self._tasks.popleft()
                    return
                task.steps = task.make()
            next(task.steps)
        except StopIteration as done:
            self._tasks.popleft()
            task.future.set_result(done.value)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, which turns it into an error
            self._tasks.popleft()
            task.future.set_exception(exc)

    def _question_unit(self) -> None:
        if self._prefill is None:
            self._prefill = self._start_prefill()
            if self._prefill is None:
                return
        prefill = self._prefill
        # 1. This unit's tokens: everything for a group of short questions, a piece of a long one.
        pieces = []
        for row in prefill.rows:
            n = min(row.remaining, self.prefill_chunk)
            pieces.append(row.job.new_ids[0, row.fed : row.fed + n])
            row.fed += n
        logits = prefill.batch.prefill(pieces)
        if any(row.remaining for row in prefill.rows):
            return
        # 2. Prefilled: each row's first token (one transfer for all); rows that go on join the running batch.
        self._prefill = None
        try:
            self._join(prefill, logits)
        except Exception:
            self._prefill = prefill  # the caller's _fail_prefill answers (and unreserves) the rows not yet settled
            raise
        prefill.batch.cache.close()  # the rows that joined hold their blocks in the running batch now

    def _join(self, prefill: _Prefill, logits: torch.Tensor) -> None:
        rows, logits = self._fork(prefill, logits)
        tokens, done = prefill.batch.sample(logits)
        for i, row in enumerate(rows):
            if tokens[i] < 0:
                prefill.settled.add(row)
                row.job.emit("error", "sampling failed: the model gave no valid distribution (NaN logits)")
                self._unreserve(row)
                continue
            if self._advance(row, tokens[i], done[i], prefill.batch.logprobs[i]):
                prefill.settled.add(row)
                self._finish(row, prefill.batch, i)
                continue
            if self._batch is None:
                self._batch = self._new_batch()
            self._batch.adopt(prefill.batch, i)
            self._running.append(row)
            prefill.settled.add(row)

    def _fork(self, prefill: _Prefill, logits: torch.Tensor) -> tuple[list[_Row], torch.Tensor]:
        """The followers join the prefill batch referencing their leader's blocks after the prompt (its position
        and rope delta; the partly filled last block is copied on write by whichever writes first; linear
        layers' small states copied) with their own sampling, and sample from their leader's logits: rows and
        logits of all."""
        rows, sources = list(prefill.rows), []
        cache = prefill.batch.cache
        for row in prefill.followers:
            i = next((j for j, r in enumerate(prefill.rows) if r.job is row.job.leader), None)
            if i is None:  # the leader failed before its prefill: this choice runs its prompt itself
                self._unreserve(row)
                self._waiting.appendleft(row)
                prefill.settled.add(row)
                continue
            row.job.history, row.job.new_ids = prefill.rows[i].job.history, prefill.rows[i].job.new_ids  # as split
            tokens = cache.book.lengths[i]
            blocks = {kind: list(tables.rows[i][: blocks_for(tokens, tables.block_size)])
                      for kind, tables in cache.kinds.items()}
            row.prefix = decode.Prefix(kv=cache.linear_state(i), tokens=tokens,
                                       rope_delta=prefill.rows[i].prefix.rope_delta, blocks=blocks)
            seen = torch.cat([row.job.history[0], row.job.new_ids[0]])
            prefill.batch.add(row.prefix, row.sampling, row.job.options.max_new_tokens, seen, row.constraint)
            row.fed = row.job.new_ids.shape[1]
            rows.append(row)
            sources.append(i)
        return rows, (torch.cat([logits, logits[sources]]) if sources else logits)

    def _start_prefill(self) -> _Prefill | None:
        """The next rows to prefill together, first come first served, within the token budget; the other
        choices of a chosen request follow their leader (prefilled once)."""
        first = self._waiting.popleft()
        chosen, followers = [first], []
        budget = self.prefill_chunk - first.remaining
        linear = self.engine.family.has_linear_layers
        self._reserve(first)
        while self._waiting and len(self._running) + len(chosen) + len(followers) < self.max_batch:
            row = self._waiting[0]
            if row.job.leader is not None and any(c.job is row.job.leader for c in chosen):
                # A choice references its leader's blocks after the prompt: counted as a row of the leader's group
                # (its prompt's blocks too, which the leader may give back first).
                if not self._fits(row):
                    break
                followers.append(self._waiting.popleft())
                self._reserve(followers[-1])
                continue
            if row.remaining > budget or not self._fits(row):
                break
            # Linear-attention states cannot be padded into, and fresh ones cannot share a batch with restored ones.
            if linear and (row.remaining != first.remaining or _fresh(row) != _fresh(first)):
                break
            chosen.append(self._waiting.popleft())
            self._reserve(row)
            budget -= row.remaining
        batch = self._new_batch()
        now = time.perf_counter()
        rows = []
        for row in chosen:
            # A prefix that does not fit the model's layers fails its own row, before any forward.
            try:
                row.prefix = self._prefix(row.job)
                _split(row.job, row.prefix.tokens)
                self._unreserve(row)  # counted again as split (the tree may have lost blocks since it was counted)
                self._reserve(row)
                seen = torch.cat([row.job.history[0], row.job.new_ids[0]])
                batch.add(row.prefix, row.sampling, row.job.options.max_new_tokens, seen, row.constraint)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                log.warning(f"a request's state does not fit the model: {type(exc).__name__}: {exc}")
                row.job.emit("error", f"the state does not fit this model: {exc}")
                self._unreserve(row)
                continue
            rows.append(row)
            self.stats.queue_wait(now - row.job.submitted)
        if not rows:
            for row in followers:
                self._unreserve(row)
            self._waiting.extendleft(reversed(followers))  # each then runs its own prompt (and fails as its leader did)
            return None
        return _Prefill(rows, batch, followers)

    def _new_batch(self) -> decode.Batch:
        if self._pool is None:
            layout = self.engine.batch()  # an empty batch: the model's layer kinds and shapes (no tensors yet)
            pool = serving_pool(layout.cache.pool, self.kv_memory)  # reserved at --kv-memory on CUDA
            layout.cache.close()
            radix = RadixTree(pool)
            pool.set_reclaim(radix.reclaim)  # kept conversations give way to running rows
            # The pool before its tree (and cleared after it): kv_stats, on another thread, reads both.
            self._pool = pool
            self._radix = radix
        return self.engine.batch(self._pool, fresh_rows=False)  # contiguous rows: their blocks become radix chains

    # -- admission by memory ---------------------------------------------------------------------------------

    def _layout(self) -> decode.KVPool:
        """The pool (made empty if none yet): its block sizes per layer kind."""
        if self._pool is None:
            self._new_batch()
        return self._pool

    def _needs(self, row: _Row) -> tuple[int, int]:
        """Bytes of blocks a row may take at most: (its own tokens', its state's)."""
        pool = self._layout()
        size, history = pool.block_size, row.job.history.shape[1]
        # What its prefix will hold, not its history: as far as the tree lost a kept conversation, the row writes
        # the rest itself (_split), each row of the group its own copy.
        tokens = self._prefix_tokens(row.job)
        end = history + row.job.new_ids.shape[1] + row.job.options.max_new_tokens
        own = state = 0
        for kind in pool.kind_layers:
            block = pool.block_bytes(kind)
            own += block * (-(-end // size) - tokens // size)  # the state's partial last block: copied on write
            state += block * (-(-tokens // size))
        return own, state

    def _prefix_tokens(self, job: Job) -> int:
        """The tokens `_prefix` would give the job now (the tree's match is what it reads, so the same)."""
        history = job.history.shape[1]
        prefix = self._prefixes.get(job.group)
        if prefix is not None:
            return min(prefix.tokens, history)
        base = history if job.base is None else job.base
        if job.root and self._radix is not None:
            got = min(self._radix.match(job.root, job.history[0].tolist())[0], history)
            if got and got >= base:
                return got
        return base

    def _fixed(self) -> int:
        pool = self._layout()
        return sum(2 * pool.block_bytes(kind) for kind in pool.kind_layers)  # NULL and SCRATCH

    def _fits(self, row: _Row) -> bool:
        if self.kv_memory is None:
            return True
        own, state = self._needs(row)
        shared = row.job.group in self._groups and row.job.group != ""
        return self._fixed() + self._reserved + own + (0 if shared else state) <= self.kv_memory

    def _refuse_too_large(self) -> None:
        """A waiting row that could not fit even with nothing else running fails now instead of waiting forever."""
        if self.kv_memory is None:
            return
        for row in [r for r in self._waiting if self._fixed() + sum(self._needs(r)) > self.kv_memory]:
            self._waiting.remove(row)
            own, state = self._needs(row)
            row.job.emit("error", f"the request needs up to {own + state} bytes of K/V blocks (its state and "
                                  f"max_tokens), more than the server's --kv-memory of {self.kv_memory} allows")

    def _reserve(self, row: _Row) -> None:
        """Count a started row's blocks: its own tokens', and its state's once per group of rows sharing it."""
        if self.kv_memory is None:
            return
        own, state = self._needs(row)
        key = row.reserved_key = f"row {id(row)}" if row.job.group == "" else row.job.group
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = [state, 0]
            self._reserved += state
        group[1] += 1
        row.reserved = own
        self._reserved += own

    def _unreserve(self, row: _Row) -> None:
        if not row.reserved:
            return
        self._reserved -= row.reserved
        row.reserved = 0
        key = row.reserved_key
        group = self._groups[key]
        group[1] -= 1
        if group[1] == 0:
            self._reserved -= group[0]
            del self._groups[key]

    def kept_bytes(self) -> int:
        """Bytes of the blocks the prefix tree keeps (read from any thread: per kind counts, updated in place)."""
        radix = self._radix
        return radix.bytes() if radix is not None else 0

    def kv_stats(self) -> dict:
        """For /health: the K/V memory bound, what started rows may take, the pool's blocks per layer kind."""
        pool, radix = self._pool, self._radix
        blocks = pool.stats() if pool else {}
        if radix is not None:
            for kind, count in radix.kept.items():  # held by the prefix tree (kept conversations), used or not
                blocks.setdefault(kind_name(kind), {})["kept"] = count
        return {"kv_memory": self.kv_memory, "reserved_bytes": self._reserved,
                "used_bytes": pool.bytes_used() if pool else 0, "blocks": blocks}

    # -- decode ----------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        self._make_room()
        if not self._running:
            return
        batch, running = self._batch, self._running
        logits = batch.step()
        self.stats.batch_size(len(running))
        tokens, done = batch.sample(logits)
        finished = []
        for slot, row in enumerate(running):
            if tokens[slot] < 0:
                row.job.emit("error", "sampling failed: the model gave no valid distribution (NaN logits)")
                finished.append((slot, False))
            elif self._advance(row, tokens[slot], done[slot], batch.logprobs[slot]):
                finished.append((slot, True))
        for slot, ok in reversed(finished):
            if ok:
                self._finish(running[slot], batch, slot)
            self._leave(slot)

    def _make_room(self) -> None:
        """Each row's next position made writable before the step (the step's own layout then takes no block): a
        row the pool cannot give a block fails alone, instead of the step's failure ending every row."""
        cache = self._batch.cache
        for slot in reversed(range(len(self._running))):
            start = cache.book.lengths[slot]
            try:
                for tables in cache.kinds.values():
                    tables.writable(slot, start, start + 1)
            except PoolFull as exc:
                self._running[slot].job.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
                self._leave(slot)

    def _leave(self, slot: int) -> None:
        self._unreserve(self._running[slot])
        self._batch.remove(slot)
        self._running[slot] = self._running[-1]
        self._running.pop()

    # -- rows ------------------------------------------------------------------------------------------------

    def _advance(self, row: _Row, token: int, done: bool, logprobs=None) -> bool:
        """Record and stream a token (and its logprobs, where asked for: before its text); True when the row is
        done (`done`: end of sequence, its length limit or its grammar, decided with the step)."""
        row.first = row.first or time.perf_counter()
        row.ended = done  # by the device's rules or the row's grammar
        if row.job.options.logprobs is not None:
            row.logprobs.append(logprobs)
            if not row.job.cancelled.is_set():
                row.job.emit("logprobs", logprobs)
        piece = row.text.add(token)
        if piece and not row.job.cancelled.is_set():
            row.job.emit("delta", piece)
        return done or row.job.cancelled.is_set()

    def _finish(self, row: _Row, batch: decode.Batch | None = None, slot: int | None = None) -> None:
        self._unreserve(row)
        job, tokens = row.job, row.text.token_ids
        if job.keep is not None and batch is not None and tokens and not job.cancelled.is_set():
            # The last token never went through the model: the row's blocks hold the ids before it.
            ids = torch.cat([job.history, job.new_ids, job.new_ids.new_tensor([tokens[:-1]])], dim=1)
            node = None
            if job.root and self._radix is not None and batch.cache.pool is self._pool:
                cache = batch.cache
                chains = {kind: tables.rows[slot][: blocks_for(ids.shape[1], tables.block_size)]
                          for kind, tables in cache.kinds.items()}
                node = self._radix.insert(job.root, ids[0].tolist(), chains)
                budget = self.kept_budget()
                if budget is not None:
                    self._radix.fit(budget)
            job.keep(ids, node, job.history.shape[1] + job.new_ids.shape[1])
        prompt = job.history.shape[1] + job.new_ids.shape[1]
        stopped = row.ended and len(tokens) < job.options.max_new_tokens  # a rule ended it, not the length limit
        answer: Answer = self.engine.answer(tokens, job.history.shape[1], prompt, _Timing(job.submitted, row.first),
                                            row.logprobs if job.options.logprobs is not None else None, stopped)
        tail = row.text.rest(answer.text)
        if tail and not job.cancelled.is_set():
            job.emit("delta", tail)
        job.emit("done", answer)

    def _fail_prefill(self, message: str) -> None:
        """After a failed prefill: its rows get the error and give back their blocks and reservations; running
        rows, in a batch of their own (on the same pool), go on."""
        prefill, self._prefill = self._prefill, None
        for row in prefill.rows + prefill.followers if prefill else []:
            if row not in prefill.settled:  # n's choices too: they wait on this prefill
                row.job.emit("error", message)
                self._unreserve(row)
        if prefill is not None:
            prefill.batch.cache.close()

    def _fail_rows(self, message: str) -> None:
        """After a failed forward: every row in it gets the error; the batch starts over."""
        rows = self._running + (self._prefill.rows + self._prefill.followers if self._prefill else [])
        for row in rows:
            row.job.emit("error", message)
        self._running, self._prefill, self._batch = [], None, None
        radix, self._radix = self._radix, None  # the tree before its pool (kv_stats reads both)
        if radix is not None:
            radix.abandon()  # its conversations are no longer found (their records see dead nodes)
        self._pool = None  # the failed forward's blocks may be held by rows no one will remove: a fresh pool
        self._reserved, self._groups = 0, {}
        for row in rows:
            row.reserved = 0


def _split(job: Job, tokens: int) -> None:
    """Move the job's history after `tokens` (what its prefix holds) to the front of its new ids."""
    if tokens < job.history.shape[1]:
        ids = torch.cat([job.history, job.new_ids], dim=1)
        job.history, job.new_ids = ids[:, :tokens], ids[:, tokens:]


def _fresh(row: _Row) -> bool:
    """A row whose linear-attention layers start from nothing (text-only). Such models keep no continuations,
    so their rows' K/V are always given as lists."""
    return any(k is None for k, _ in row.job.kv)
