"""Requests that join and leave a running batch at random moments, straight into the scheduler."""

import random
import threading
import time

from vlcache import prompt
from vlcache.engine import GenerationOptions
from vlcache.serving.scheduler import Job, Scheduler


def job_for(engine, state, question, max_new_tokens, key, cancel_after=None):
    """A Job like the server's: continuing from `state` (None: text-only); collects its events.

    `cancel_after` n: the job is cancelled as its n-th piece arrives (what a stop string does).
    """
    if state is None:
        new_ids = prompt.text_only_ids(engine.processor, None, question).to(engine.device)
        kv, history, delta, group = engine.empty_kv(), new_ids[:, :0], 0, ""
    else:
        new_ids = engine.question_ids(state.metadata.messages, question)
        kv, history, delta, group = state.kv, state.input_ids, int(state.rope_deltas.view(-1)[0]), key
    events = []
    finished = threading.Event()

    def emit(kind, value):
        events.append((kind, value))
        if kind != "delta":
            finished.set()
        elif cancel_after is not None and len(events) >= cancel_after:
            job.cancelled.set()

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0)
    job = Job(kv=kv, history=history, new_ids=new_ids, rope_delta=delta, options=options, emit=emit, group=group)
    return job, events, finished


def churn(engine, requests, seed, max_batch=3, prefill_chunk=8, cancel_after=None):
    """Submit (state, key, question, max_new_tokens) requests at random moments; {index: its events}.

    `cancel_after` {index: n}: cancel that request as its n-th piece arrives.
    """
    rng = random.Random(seed)
    scheduler = Scheduler(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
    out = {}
    try:
        watched = []
        for i, (state, key, question, n) in enumerate(requests):
            job, events, finished = job_for(engine, state, question, n, key, (cancel_after or {}).get(i))
            watched.append((i, job, events, finished))
            scheduler.submit(job)
            time.sleep(rng.random() * 0.03)
        deadline = time.time() + 120
        while not all(finished.is_set() for _, _, _, finished in watched):
            assert time.time() < deadline, "a request never finished"
            time.sleep(0.005)
        out = {i: events for i, _, events, _ in watched}
    finally:
        scheduler.stop()
    return out
