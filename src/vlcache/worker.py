"""The model worker: one thread owns the model; requests that wait together are decoded together.

Requests about the same state (same image prefix, or text-only) form one batch over the shared prefix; each
row has its own sampler, token limit and stop flag, so rows never see each other's tokens. Image states are
also computed here, one at a time, so the model is only ever used by this thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from . import generate
from .engine import Answer, Engine, GenerationOptions, TextAssembler, _Timing


@dataclass
class Job:
    group: str  # rows with the same group share a prefix: the state key, or "" for text-only
    kv: list  # the prefix K/V ([1, kv_heads, n, D] per layer)
    history: torch.Tensor  # the prefix ids [1, n]
    new_ids: torch.Tensor  # [1, m]
    rope_delta: int
    options: GenerationOptions
    emit: Callable[[str, object], None]  # ("delta", text) and finally ("done", Answer) or ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # Called with the row's ids and the K/V after the prefix (all but the answer's last token), to continue from.
    keep: Callable[[torch.Tensor, list], None] | None = None


class ModelWorker:
    def __init__(self, engine: Engine, max_batch: int = 16):
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vlcache-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the model thread (computing an image state); the Future carries its result."""
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)

    # -- the model thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            waiting = [item]
            while True:  # everything that queued up meanwhile joins this round
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in waiting:
                return
            jobs = []
            for entry in waiting:
                if isinstance(entry, Job):
                    jobs.append(entry)
                else:
                    self._call(*entry)
            groups: dict[str, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.group, []).append(job)
            can_pad = not self.engine.family.has_linear_layers
            for group in groups.values():
                for rows in generate.batch_groups([job.new_ids.shape[1] for job in group], can_pad):
                    for start in range(0, len(rows), self.max_batch):
                        self._generate([group[r] for r in rows[start : start + self.max_batch]])

    @staticmethod
    def _call(fn, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the waiting request, which turns it into an HTTP error
            future.set_exception(exc)

    def _generate(self, jobs: list[Job]) -> None:
        engine = self.engine
        try:
            samplers = [engine.sampler(job.options) for job in jobs]
            limits = [job.options.max_new_tokens for job in jobs]
            capacity = max(job.new_ids.shape[1] for job in jobs) + max(limits)
            cache = generate.cache_from_kv(engine.model.config, jobs[0].kv, batch=len(jobs), capacity=capacity,
                                          prefix_tokens=jobs[0].history.shape[1])
            texts = [TextAssembler(engine.processor.tokenizer) for _ in jobs]
            firsts: list[float | None] = [None] * len(jobs)
            steps = generate.generate_steps(
                engine.model, cache, jobs[0].history, [job.new_ids for job in jobs], jobs[0].rope_delta, samplers,
                limits, engine.eos_ids, engine.family.positions, stopped=lambda row: jobs[row].cancelled.is_set(),
            )
            for step in steps:
                for row, token in enumerate(step):
                    if token is None or jobs[row].cancelled.is_set():
                        continue
                    firsts[row] = firsts[row] or time.perf_counter()
                    piece = texts[row].add(token)
                    if piece:
                        jobs[row].emit("delta", piece)
            width = max(job.new_ids.shape[1] for job in jobs)
            for row, (job, text) in enumerate(zip(jobs, texts)):
                if job.keep is not None and text.token_ids and not job.cancelled.is_set():
                    job.keep(*_row_state(cache, row, job, width, text.token_ids))
            for job, text, first in zip(jobs, texts, firsts):
                answer: Answer = engine.answer(
                    text.token_ids, job.history.shape[1], job.history.shape[1] + job.new_ids.shape[1], _Timing(job.submitted, first)
                )
                tail = text.rest(answer.text)
                if tail:
                    job.emit("delta", tail)
                job.emit("done", answer)
        except Exception as exc:  # noqa: BLE001 - every waiting client gets an answer, never a hang
            for job in jobs:
                job.emit("error", f"generation failed: {exc}")


def _row_state(cache, row: int, job: Job, width: int, generated: list[int]) -> tuple[torch.Tensor, list]:
    """One row's tokens (prefix included) and the K/V of what followed the prefix, without the padding."""
    pad = width - job.new_ids.shape[1]
    end = width + len(generated) - 1  # the last generated token never went through the model
    ids = torch.cat([job.history, job.new_ids, torch.tensor([generated[:-1]], device=job.new_ids.device)], dim=1)
    kv = [(layer.keys[row : row + 1, :, pad:end].clone(), layer.values[row : row + 1, :, pad:end].clone()) for layer in cache.layers]
    return ids, kv
