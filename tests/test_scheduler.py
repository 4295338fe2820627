"""Continuous batching: rows join and leave a running batch at any step and still answer as they would alone."""

import concurrent.futures
import http.client
import json
import random
import threading
import time
import urllib.request

import pytest
import torch

from churn import churn, job_for
from conftest import SYSTEM, photo
from reference import reference_tokens
from test_server import LiveServer, image_messages
from vlcache.engine import GenerationOptions, TextAssembler
from vlcache.families.base import run_steps
from vlcache.serving.scheduler import Scheduler

QUESTIONS = ["What is this?", "Describe the colors of everything you can see in this picture, one by one.",
             "Why?", "Is it day or night, and how can you tell?", "Count the objects."]


@pytest.fixture(scope="module")
def states(engine):
    return {name: engine.cache_image(photo(name), system_prompt=SYSTEM) for name in ("astronaut.png", "rocket.jpg", "chelsea.png")}


def mixed_requests(states, seed):
    rng = random.Random(seed)
    names = [None] + list(states)  # None: a text-only row
    requests = []
    for i in range(9):
        name = rng.choice(names)
        state = states[name] if name else None
        requests.append((state, name or "", rng.choice(QUESTIONS), rng.randint(1, 20)))
    return requests


def alone(engine, request):
    state, _, question, n = request
    return engine.ask(state, question, max_new_tokens=n, temperature=0).token_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_joining_and_leaving_at_random_steps_answer_as_alone(engine, states, seed):
    requests = mixed_requests(states, seed)
    # Three rows at most (others wait for a free row), questions prefilled 8 tokens a step (long ones in pieces),
    # two rows stopped early as a stop string would.
    cancel = {1: 2, 6: 1}
    out = churn(engine, requests, seed, max_batch=3, prefill_chunk=8, cancel_after=cancel)
    for i, request in enumerate(requests):
        kind, answer = out[i][-1]
        assert kind == "done", answer
        expected = alone(engine, request)
        if i in cancel:  # cut short: what it produced is the start of its own answer, and it left at once
            assert answer.token_ids == expected[: len(answer.token_ids)], i
            pieces = [piece for kind, piece in out[i] if kind == "delta"]
            assert len(pieces) <= cancel[i] and "".join(pieces) == answer.text, i
            if _pieces(engine, expected) > cancel[i]:
                assert len(answer.token_ids) < len(expected), i
        else:
            assert answer.token_ids == expected, i


def _pieces(engine, token_ids):
    text = TextAssembler(engine.processor.tokenizer)
    return sum(1 for token in token_ids if text.add(token))


def test_alone_equals_generate(engine, states):
    """The reference above is itself exact: a row alone equals transformers' generate."""
    for name, question in (("rocket.jpg", QUESTIONS[1]), ("chelsea.png", QUESTIONS[2])):
        job, events, finished = job_for(engine, states[name], question, 12, name)
        scheduler = Scheduler(engine, max_batch=4, prefill_chunk=5)
        try:
            scheduler.submit(job)
            assert finished.wait(60)
        finally:
            scheduler.stop()
        assert events[-1][1].token_ids == reference_tokens(engine, photo(name), SYSTEM, question, 12)


def in_one_batch(engine, bad, good, bad_done, good_done):
    """Submit a bad job and a good one while the model thread is held, so that they share a batch; wait for both."""
    scheduler = Scheduler(engine, max_batch=4)
    try:
        blocker, blocking = threading.Event(), threading.Event()
        scheduler.call(lambda: (blocking.set(), blocker.wait()))
        assert blocking.wait(30)
        scheduler.submit(bad)
        scheduler.submit(good)
        blocker.set()
        assert good_done.wait(60) and bad_done.wait(60)
    finally:
        scheduler.stop()


def test_a_broken_distribution_fails_its_row_alone(engine, states):
    """A row whose logits are NaN (its state's K/V are) cannot be sampled: it fails, its batch-mates do not."""
    good, good_events, good_done = job_for(engine, states["rocket.jpg"], QUESTIONS[0], 10, "rocket.jpg")
    bad, bad_events, bad_done = job_for(engine, states["rocket.jpg"], QUESTIONS[2], 10, "rocket-nan")
    bad.kv = [(torch.full_like(k, float("nan")), v) for k, v in states["rocket.jpg"].kv]
    bad.options = GenerationOptions(max_new_tokens=10, temperature=1.0, seed=666)
    in_one_batch(engine, bad, good, bad_done, good_done)
    assert bad_events[-1][0] == "error"
    assert good_events[-1][0] == "done"
    assert good_events[-1][1].token_ids == alone(engine, (states["rocket.jpg"], "", QUESTIONS[0], 10))


def test_an_image_state_in_pieces_equals_generate(engine):
    steps = engine.cache_media_steps([photo("hubble_deep_field.jpg")], [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": [{"type": "image"}]}], chunk=16)
    units = 0
    while True:
        try:
            next(steps)
            units += 1
        except StopIteration as done:
            state = done.value
            break
    assert units >= state.num_tokens // 16  # the vision encoder, then the prefix 16 tokens at a time
    whole = engine.cache_image(photo("hubble_deep_field.jpg"), system_prompt=SYSTEM)
    assert int(state.rope_deltas) == int(whole.rope_deltas) and state.input_ids.equal(whole.input_ids)
    for question in QUESTIONS[:2]:
        expected = reference_tokens(engine, photo("hubble_deep_field.jpg"), SYSTEM, question, 12)
        assert engine.ask(state, question, max_new_tokens=12, temperature=0).token_ids == expected


def test_an_image_state_is_computed_between_decode_steps(engine, states):
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=16)
    order = []
    task_unit, decode = scheduler._task_unit, scheduler._decode
    scheduler._task_unit = lambda: (order.append("state"), task_unit())
    scheduler._decode = lambda: (order.append("decode"), decode())
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"type": "image"}]}]
    try:
        long, events, finished = job_for(engine, states["rocket.jpg"], QUESTIONS[0], 400, "rocket.jpg")
        scheduler.submit(long)
        while not any(kind == "delta" for kind, _ in events):
            time.sleep(0.01)
        future = scheduler.compute(lambda: engine.cache_media_steps([photo("coffee.png")], messages, chunk=16))
        state = future.result(timeout=120)
        long.cancelled.set()
        assert finished.wait(60)
    finally:
        scheduler.stop()
    first, last = order.index("state"), len(order) - 1 - order[::-1].index("state")
    assert order[first:last + 1].count("state") > 3
    # Between two pieces of the state, the running answer took a step: it never froze.
    assert all(order[i + 1] == "decode" for i in range(first, last) if order[i] == "state")
    assert state.num_tokens > 16


# -- through the server ------------------------------------------------------------------------------------------

@pytest.fixture
def busy_server(engine, tmp_path):
    live = LiveServer(engine, tmp_path / "states", max_batch=4, prefill_chunk=32)
    yield live
    live.close()


def chat(live, name, question, stop=None, max_tokens=12):
    messages = image_messages(name, question) if name else [{"role": "user", "content": question}]
    reply = live.client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0, stop=stop)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def test_churn_through_the_server_with_stop_strings(busy_server):
    rng = random.Random(7)
    requests = []
    for i in range(10):
        name = rng.choice([None, "astronaut.png", "rocket.jpg", "chelsea.png"])
        requests.append((name, rng.choice(QUESTIONS), rng.choice([None, None, "e", " t"]), rng.randint(2, 24)))
    expected = [chat(busy_server, *request) for request in requests]

    def staggered(request):
        time.sleep(rng.random() * 0.5)
        return chat(busy_server, *request)

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        together = list(pool.map(staggered, requests))
    assert together == expected
    assert any(finish == "stop" for _, finish in expected) and any(finish == "length" for _, finish in expected)


def test_a_new_question_is_not_held_up_by_a_long_stream(busy_server):
    client = busy_server.client
    chat(busy_server, "rocket.jpg", "warm up")  # the state is cached: both questions below only prefill text

    def ttft(question):
        start = time.perf_counter()
        stream = client.chat.completions.create(model="m", messages=image_messages("rocket.jpg", question), max_tokens=4,
                                                temperature=0, stream=True)
        first = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
        return first

    time_alone = min(ttft("How many people are there?") for _ in range(3))
    arrivals = []
    long_done = threading.Event()

    def long_answer():
        stream = client.chat.completions.create(model="m", messages=image_messages("rocket.jpg", "Tell me everything."),
                                                max_tokens=1500, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
        long_done.set()

    thread = threading.Thread(target=long_answer)
    thread.start()
    while len(arrivals) < 20:
        time.sleep(0.01)
    time_busy = ttft("How many people are there?")
    short_done = time.perf_counter()
    assert not long_done.is_set(), "the long answer should still be streaming"
    thread.join(timeout=300)
    assert time_busy < 5 * time_alone + 0.5, (time_busy, time_alone)
    assert sum(1 for t in arrivals if t > short_done) > 100  # and it kept streaming afterwards


def test_a_full_queue_answers_429_with_retry_after(engine, tmp_path):
    live = LiveServer(engine, tmp_path / "states", max_batch=1, max_queue=0)
    try:
        stream = live.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=2000, temperature=0, stream=True)
        next(iter(stream))
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
        request = urllib.request.Request(live.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 429
        assert refused.value.headers["Retry-After"] == "1"
        assert json.loads(refused.value.read())["error"]["type"] == "rate_limit_exceeded"
        stream.close()
        deadline = time.time() + 30
        while live.service.in_flight and time.time() < deadline:
            time.sleep(0.05)
        assert chat(live, None, "Hi", max_tokens=2)[1] == "length"  # room again once the stream went away
        metrics = urllib.request.urlopen(live.url + "/metrics", timeout=30).read().decode()
        assert "vlcache_rejected_requests_total 1.0" in metrics
    finally:
        live.close()


def test_a_client_that_hangs_up_frees_its_row(busy_server):
    scheduler = busy_server.service.scheduler
    for stream in (False, True):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000,
                           "temperature": 0, "stream": stream})
        connection = http.client.HTTPConnection("127.0.0.1", busy_server.port, timeout=30)
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        deadline = time.time() + 30
        while scheduler.running == 0:
            assert time.time() < deadline
            time.sleep(0.01)
        connection.close()  # gone without reading the answer
        deadline = time.time() + 10
        while scheduler.running:
            assert time.time() < deadline, f"the row of a gone client (stream={stream}) kept decoding"
            time.sleep(0.01)


def test_metrics_show_the_batch(busy_server):
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda q: chat(busy_server, "astronaut.png", q), QUESTIONS[:4]))
    assert [reason for _, reason in answers] == ["length"] * 4  # 12 tokens each, so the step counts below hold
    # A client has its last token before the model thread takes its row out of the batch: wait for the gauges.
    deadline = time.monotonic() + 10
    while True:
        metrics = urllib.request.urlopen(busy_server.url + "/metrics", timeout=30).read().decode()
        if "vlcache_running_rows 0.0" in metrics or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name in ("vlcache_running_rows 0.0", "vlcache_queued_requests 0.0", "vlcache_queue_wait_seconds_count 4.0",
                 "vlcache_batch_size_count"):
        assert name in metrics, name
    steps = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("vlcache_batch_size_count")))
    rows = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("vlcache_batch_size_sum")))
    assert steps >= 11 and rows >= 4 * 11  # 12 tokens each: 11 decode steps a row after the first token


def test_run_steps_returns_the_result():
    def steps():
        yield
        yield
        return "done"

    assert run_steps(steps()) == "done"


def test_memory_grows_with_what_rows_hold_not_with_their_limits(engine, states):
    """Issue 13, finding 17: no buffer sized by max_tokens up front; a queued row holds no copy of its prefix."""
    scheduler = Scheduler(engine, max_batch=16)
    made = []
    try:
        blocker, blocking = threading.Event(), threading.Event()
        scheduler.call(lambda: (blocking.set(), blocker.wait()))
        assert blocking.wait(30)  # the model thread is held: what arrives now queues
        job, events, finished = job_for(engine, states["rocket.jpg"], QUESTIONS[0], 4000, "continued")
        kv = job.kv
        job.kv = lambda: (made.append(1), kv)[1]  # how the server hands over a kept conversation's K/V
        scheduler.submit(job)
        time.sleep(0.2)
        assert made == []  # queued: nothing built yet
        blocker.set()
        while sum(1 for kind, _ in events if kind == "delta") < 5:
            time.sleep(0.005)
        others = [job_for(engine, states["chelsea.png"], f"Question {i}?", 60, "chelsea.png") for i in range(12)]
        for other, _, _ in others:  # rows joining one by one grow the batch's rows, not its length
            scheduler.submit(other)
            time.sleep(0.01)
        assert all(done.wait(60) for _, _, done in others)
        from vlcache.decode.blocks import NULL, RESERVED, blocks_for
        from vlcache.decode.rows import CAPACITY_STEP

        def look():  # on the model thread, between steps: the rocket row goes on decoding meanwhile
            cache = scheduler._batch.cache
            (kind, tables), = cache.kinds.items()
            prefix_blocks = cache.pool.held[cache.book.prefixes[0]].blocks[kind]
            return {"longest": cache.book.longest(), "capacity": cache.book.capacity, "row": list(tables.rows[0]),
                    "size": tables.block_size, "pool_capacity": tables.pool.capacity, "peak": tables.pool.peak,
                    "used": tables.pool.used, "held": len(cache.pool.held), "prefix": prefix_blocks,
                    "one_pool": scheduler._prefill is None and cache.pool is scheduler._pool}

        seen = scheduler.call(look).result(60)
        # grown to what rows hold (prefix and tokens, in blocks), not to 4,000 more positions
        assert made == [1] and seen["capacity"] <= 2 * (seen["longest"] + CAPACITY_STEP) < 4000
        assert NULL not in seen["row"] and len(seen["row"]) == blocks_for(seen["longest"], seen["size"])
        assert seen["pool_capacity"] <= 2 * seen["peak"] + RESERVED and seen["one_pool"]
        # Nothing else holds a block: the twelve rows that finished, their state and the prefill batches gave theirs back.
        assert seen["held"] == 1 and seen["used"] == len(set(seen["row"]) | set(seen["prefix"]))
        job.cancelled.set()
        assert finished.wait(60)
    finally:
        scheduler.stop()


def test_a_job_that_cannot_start_fails_alone(engine, states, monkeypatch):
    real = engine.sampling

    def sampling(options, *rest):
        if options.seed == 13:
            raise ValueError("no sampler for these options")
        return real(options, *rest)

    monkeypatch.setattr(engine, "sampling", sampling)
    scheduler = Scheduler(engine, max_batch=4)
    try:
        bad, bad_events, bad_done = job_for(engine, states["rocket.jpg"], QUESTIONS[0], 4, "rocket.jpg")
        bad.options = GenerationOptions(max_new_tokens=4, temperature=1.0, seed=13)
        scheduler.submit(bad)
        assert bad_done.wait(30) and bad_events[-1][0] == "error"
        good, good_events, good_done = job_for(engine, states["rocket.jpg"], QUESTIONS[0], 4, "rocket.jpg")
        scheduler.submit(good)  # the model thread is still there
        assert good_done.wait(30) and good_events[-1][0] == "done"
    finally:
        scheduler.stop()


def test_control_rows_that_attend_to_another_rows_image_are_caught(engine, states, monkeypatch):
    """Control: if the batch gave every row the first row's image state, the churn test would fail."""
    from vlcache.decode import RowsCache

    real = RowsCache.add

    def first_prefix_for_all(self, prefix):
        self.__dict__.setdefault("_first_prefix", prefix)
        return real(self, self._first_prefix if prefix.tokens <= self._first_prefix.tokens else prefix)

    monkeypatch.setattr(RowsCache, "add", first_prefix_for_all)
    requests = [(states["rocket.jpg"], "rocket.jpg", QUESTIONS[0], 8), (states["chelsea.png"], "chelsea.png", QUESTIONS[0], 8)]
    scheduler = Scheduler(engine, max_batch=4)
    try:
        blocker, blocking = threading.Event(), threading.Event()
        scheduler.call(lambda: (blocking.set(), blocker.wait()))
        assert blocking.wait(30)
        jobs = [job_for(engine, state, question, n, key) for state, key, question, n in requests]
        for job, _, _ in jobs:
            scheduler.submit(job)  # both arrive together: one batch, two image states
        blocker.set()
        assert all(done.wait(60) for _, _, done in jobs)
    finally:
        scheduler.stop()
    answers = [events[-1][1].token_ids for _, events, _ in jobs]
    assert answers[0] == alone(engine, requests[0])  # the first row's own image: unharmed
    assert answers[1] != alone(engine, requests[1])  # the second row saw the wrong image: caught


def test_a_state_that_does_not_fit_the_model_fails_its_row_alone(engine, states):
    """Issue 20, finding 1 (the scheduler's half): a state with one layer of another head_dim reaches the model
    thread (as an upload that slipped past its checks would): its row fails before any forward, and a row
    batched with it answers exactly."""
    good, good_events, good_done = job_for(engine, states["rocket.jpg"], QUESTIONS[0], 10, "rocket.jpg")
    bad, bad_events, bad_done = job_for(engine, states["rocket.jpg"], QUESTIONS[2], 10, "forged")
    kv = list(states["rocket.jpg"].kv)
    k, v = kv[0]
    kv[0] = (k[..., : k.shape[-1] // 2].contiguous(), v[..., : v.shape[-1] // 2].contiguous())
    bad.kv = kv
    in_one_batch(engine, bad, good, bad_done, good_done)
    assert bad_events[-1][0] == "error"
    assert bad_events[-1][1].startswith("the state does not fit this model: layer 0: K/V of shape [1, ")
    assert good_events[-1][0] == "done"
    assert good_events[-1][1].token_ids == alone(engine, (states["rocket.jpg"], "", QUESTIONS[0], 10))
