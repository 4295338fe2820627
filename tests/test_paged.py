"""Rows read K/V through block tables (issue 28): one physical copy of a shared state, copy-on-write, controls."""

import threading

import pytest
import torch

from conftest import SYSTEM, photo
from vlcache import decode
from vlcache.decode.blocks import NULL, blocks_for

N = 6
QUESTIONS = ["What is in the picture?", "Describe the colours in a few words.", "Is it day or night?",
             "What would you title this photograph?"]


def _tokens(batch, question_ids):
    out = [[] for _ in question_ids]
    for step in decode.generate(batch, question_ids):
        for i, token in enumerate(step):
            if token is not None:
                out[i].append(token)
    return out


def _own_blocks_only(cache, prefix_tokens: int) -> None:
    """Per layer kind: every row shares the prefix's blocks (all of them where its own tokens begin on a fresh
    block, else the whole ones: the partly filled last one is copied) and holds blocks of its own tokens only;
    the pool holds exactly those."""
    held = next(iter(cache.pool.held.values())).blocks
    for kind, tables in cache.kinds.items():
        size = tables.block_size
        shared = blocks_for(prefix_tokens, size) if cache.fresh_rows else prefix_tokens // size
        prefix = [b for b in held[kind] if b != NULL]
        own = []
        for slot, row in enumerate(tables.rows):
            assert row[:shared] == held[kind][:shared]
            mine = [b for b in row[shared:] if b != NULL]
            own_tokens = cache.book.lengths[slot] - prefix_tokens
            assert len(mine) == (blocks_for(own_tokens, size) if cache.fresh_rows
                                 else blocks_for(cache.book.lengths[slot], size) - shared)
            own += mine
        assert len(set(own)) == len(own) and not set(own) & set(prefix)  # no row's block is another's
        assert tables.pool.used == len(prefix) + len(own)


def test_sixteen_rows_on_one_state_allocate_blocks_for_their_own_tokens_only(engine, astronaut_state):
    made = []
    real = engine.batch
    engine.batch = lambda: made.append(real()) or made[-1]
    try:
        prompts = [QUESTIONS[i % 4] + f" ({i})" for i in range(16)]
        answers = engine.ask_many(astronaut_state, prompts, max_new_tokens=N, temperature=0)
    finally:
        del engine.batch
    (batch,) = made
    cache = batch.cache
    n = astronaut_state.num_tokens
    assert n % 16 != 0  # a partly filled last block: each row copies it (16 copies, not 16 states)
    _own_blocks_only(cache, n)
    (tables,) = cache.kinds.values()
    state_blocks = blocks_for(n, tables.block_size)
    assert tables.pool.used < state_blocks + 16 * 3  # a private copy each would be 16 * state_blocks (~290)
    alone = engine.ask(astronaut_state, prompts[5], max_new_tokens=N, temperature=0)
    assert answers[5].token_ids == alone.token_ids
    for slot in reversed(range(batch.rows)):
        batch.remove(slot)
    assert tables.pool.used == 0 and set(tables.pool.refs) == {0} and not cache.pool.held  # all back


def test_control_a_block_table_pointing_at_another_states_block_changes_the_answer(engine, astronaut_state):
    other = engine.cache_image(photo("camera.png"), system_prompt=SYSTEM)
    question = engine.question_ids(astronaut_state.metadata.messages, QUESTIONS[0])[0]

    def run(swap: bool):
        batch = engine.batch()
        batch.add(engine.state_prefix(astronaut_state), decode.SamplingParams(0.0), 12, question)
        batch.add(engine.state_prefix(other), decode.SamplingParams(0.0), 12, question)
        if swap:  # row 0's whole blocks after the first become row 1's: the same positions of another image
            for tables in batch.cache.kinds.values():
                for j in range(1, astronaut_state.num_tokens // tables.block_size):
                    theirs, mine = tables.rows[1][j], tables.rows[0][j]
                    tables.pool.hold(theirs)
                    tables.pool.release(mine)
                    tables.rows[0][j] = theirs
                    with torch.inference_mode():
                        tables.table[0, j] = theirs
        return _tokens(batch, [question, question])[0]

    expected = engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=12, temperature=0).token_ids
    assert min(other.num_tokens, astronaut_state.num_tokens) > 9 * 16
    assert run(swap=False) == expected
    assert run(swap=True) != expected


@pytest.mark.parametrize("copy_on_write", [True, False])
def test_a_shared_partial_block_is_copied_on_write_and_control(engine, astronaut_state, copy_on_write):
    """Two rows on one state whose last block is partly filled: each writes its question after it, into the
    same positions. With copy-on-write each row gets a copy of that block and answers as alone; without
    (control) both write into the one block, one row's question keys overwrite the other's and the answers
    change."""
    n = astronaut_state.num_tokens
    assert n % 16 != 0
    prefix = engine.state_prefix(astronaut_state)
    questions = [QUESTIONS[1], QUESTIONS[0]]
    ids = [engine.question_ids(astronaut_state.metadata.messages, q)[0] for q in questions]
    batch = engine.batch(fresh_rows=False)  # the server's rows: contiguous, so they write into that block
    for question in ids:
        batch.add(prefix, decode.SamplingParams(0.0), 12, question)
    for tables in batch.cache.kinds.values():
        tables.copy_on_write = copy_on_write
    got = _tokens(batch, ids)
    alone = [engine.ask(astronaut_state, q, max_new_tokens=12, temperature=0).token_ids for q in questions]
    (tables,) = batch.cache.kinds.values()
    partial = n // tables.block_size
    shared = tables.rows[0][partial] == tables.rows[1][partial]
    if copy_on_write:
        assert got == alone and not shared
    else:
        assert shared and got != alone


def test_rows_move_between_batches_without_copying_the_state_twice(engine, astronaut_state):
    """The server prefills rows in a batch of their own and moves them into the running one (adopt): the
    running batch holds the state once, the rows' own blocks copied; answers as alone."""
    prefix = engine.state_prefix(astronaut_state)
    ids = [engine.question_ids(astronaut_state.metadata.messages, q)[0] for q in QUESTIONS[:3]]
    running = engine.batch()
    got = []
    for question in ids:
        prefill = engine.batch()
        prefill.add(prefix, decode.SamplingParams(0.0), N, question)
        first, _ = prefill.sample(prefill.prefill([question]))
        got.append(first)
        running.adopt(prefill, 0)
    _own_blocks_only(running.cache, astronaut_state.num_tokens)
    for _ in range(N - 1):
        tokens, _ = running.sample(running.step())
        for row, token in zip(got, tokens):
            row.append(token)
    for question, tokens in zip(QUESTIONS, got):
        alone = engine.ask(astronaut_state, question, max_new_tokens=N, temperature=0).token_ids
        assert tokens[: len(alone)] == alone


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_5", "lfm2_vl", "llama4", "gemma4", "mistral3"])
def test_every_layer_kind_shares_the_state_and_answers_as_alone(kind, family_engine):
    """Sliding windows (Gemma 3, Mistral), chunked layers (Llama 4), linear and conv states (Qwen3.5, LFM2:
    per row), shared layers (Gemma 4: no blocks): three rows on one state each equal asking alone, and hold
    blocks of their own tokens only."""
    engine = family_engine(kind)
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=160 * 160)
    made = []
    real = engine.batch
    engine.batch = lambda: made.append(real()) or made[-1]
    try:
        questions = [q + " Answer briefly." for q in QUESTIONS[:3]] if engine.family.has_linear_layers else QUESTIONS[:3]
        answers = engine.ask_many(state, questions, max_new_tokens=N, temperature=0)
    finally:
        del engine.batch
    for batch in made:
        if batch.rows > 1:
            _own_blocks_only(batch.cache, state.num_tokens)
    for question, answer in zip(questions, answers):
        assert answer.token_ids == engine.ask(state, question, max_new_tokens=N, temperature=0).token_ids


def test_the_servers_scheduler_holds_one_copy_of_a_state_for_sixteen_rows(engine, astronaut_state):
    """Sixteen questions about one state through the server's scheduler (prefilled in a batch of their own,
    then moved into the running one): while all sixteen decode, the pool holds the state's blocks once and
    each row's own; every answer equals asking alone; after they finish, no block is held."""
    from churn import job_for
    from vlcache.serving.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch=16, prefill_chunk=512)
    try:
        blocker, blocking = threading.Event(), threading.Event()
        scheduler.call(lambda: (blocking.set(), blocker.wait()))
        assert blocking.wait(30)  # all sixteen queue, then join in one prefill
        questions = [QUESTIONS[i % 4] + f" ({i})" for i in range(16)]
        jobs = [job_for(engine, astronaut_state, q, 24, "astronaut") for q in questions]
        for job, _, _ in jobs:
            scheduler.submit(job)
        seen = []

        def look():
            if len(scheduler._running) == 16 and not seen:
                cache = scheduler._batch.cache
                _own_blocks_only(cache, astronaut_state.num_tokens)  # raises here: the Future carries it
                seen.append(cache.pool.stats()["full"])

        blocker.set()
        while not seen and not all(done.is_set() for _, _, done in jobs):
            scheduler.call(look).result(60)
        assert seen, "the sixteen rows never ran together"
        state_blocks = blocks_for(astronaut_state.num_tokens, 16)
        assert state_blocks < seen[0]["used"] < state_blocks + 16 * 4 and seen[0]["shared"] >= state_blocks - 1
        assert all(done.wait(60) for _, _, done in jobs)
        for question, (_, events, _) in zip(questions, jobs):
            kind, answer = events[-1]
            assert kind == "done", answer
            assert answer.token_ids == engine.ask(astronaut_state, question, max_new_tokens=24, temperature=0).token_ids
        stats = scheduler.call(lambda: (scheduler._pool.stats()["full"], len(scheduler._pool.held))).result(60)
        assert stats[0]["used"] == 0 and stats[1] == 0
    finally:
        scheduler.stop()


def _run_bounded(engine, jobs, kv_memory):
    """Submit `jobs` (from churn.job_for) at once to a Scheduler bounded to `kv_memory` bytes of K/V; the most
    rows that decoded together, and the /health figures seen meanwhile."""
    from vlcache.serving.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch=8, prefill_chunk=512, kv_memory=kv_memory)
    try:
        blocker, blocking = threading.Event(), threading.Event()
        scheduler.call(lambda: (blocking.set(), blocker.wait()))
        assert blocking.wait(30)
        for job, _, _ in jobs:
            scheduler.submit(job)
        most, health = [0], []
        blocker.set()
        while not all(done.is_set() for _, _, done in jobs):
            most[0] = max(most[0], scheduler.call(lambda: len(scheduler._running)).result(60))
            health.append(scheduler.kv_stats())
        assert all(done.wait(60) for _, _, done in jobs)
        after = scheduler.call(lambda: (scheduler._reserved, scheduler._pool.stats())).result(60)
        return most[0], health, after
    finally:
        scheduler.stop()


def _needs(engine, jobs):
    """(bytes of NULL and SCRATCH, [(own, state) bytes per job]) as the scheduler reckons them."""
    from vlcache.serving.scheduler import Scheduler

    scheduler = Scheduler(engine, kv_memory=1 << 40)
    try:
        return scheduler.call(lambda: (scheduler._fixed(), [scheduler._needs(scheduler._row(j)) for j, _, _ in jobs])).result(60)
    finally:
        scheduler.stop()


def test_a_request_whose_blocks_do_not_fit_waits_in_the_queue_and_control(engine, astronaut_state):
    """Two questions about two states under a --kv-memory that holds either but not both: the second waits until
    the first is done (one row at a time), both answer as alone, and all is given back after. Control: unbounded,
    they decode together."""
    from churn import job_for

    other = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)
    cases = [(astronaut_state, QUESTIONS[0], "astronaut"), (other, QUESTIONS[1], "rocket")]

    def jobs():
        return [job_for(engine, state, q, 16, key) for state, q, key in cases]

    fixed, needs = _needs(engine, jobs())
    bound = fixed + sum(own + state for own, state in needs) - 1
    for kv_memory, together in [(bound, 1), (None, 2)]:
        made = jobs()
        most, health, (reserved, stats) = _run_bounded(engine, made, kv_memory)
        assert most == together
        for (state, question, _), (_, events, _) in zip(cases, made):
            kind, answer = events[-1]
            assert kind == "done", answer
            assert answer.token_ids == engine.ask(state, question, max_new_tokens=16, temperature=0).token_ids
        assert reserved == 0 and stats["full"]["used"] == 0
        if kv_memory is not None:
            assert all(h["kv_memory"] == bound and fixed + h["reserved_bytes"] <= bound for h in health)
            assert max(h["used_bytes"] for h in health) > 0


def test_rows_on_one_state_are_admitted_counting_the_state_once(engine, astronaut_state):
    """A bound that holds the state once and two rows' own tokens: both rows decode together."""
    from churn import job_for

    def jobs():
        return [job_for(engine, astronaut_state, q, 16, "astronaut") for q in QUESTIONS[:2]]

    fixed, needs = _needs(engine, jobs())
    bound = fixed + needs[0][1] + needs[0][0] + needs[1][0]
    assert bound < fixed + sum(own + state for own, state in needs)  # two copies would not fit
    most, _, (reserved, _) = _run_bounded(engine, jobs(), bound)
    assert most == 2 and reserved == 0


def test_a_request_that_cannot_fit_even_alone_fails_at_once(engine, astronaut_state):
    from churn import job_for

    made = [job_for(engine, astronaut_state, QUESTIONS[0], 16, "astronaut")]
    fixed, needs = _needs(engine, made)
    _run_bounded(engine, made, fixed + sum(needs[0]) - 1)
    kind, message = made[0][1][-1]
    assert kind == "error" and "--kv-memory" in message


def test_refcounts_return_to_zero_after_1000_random_joins_and_leaves_of_rows(engine):
    """RowsCache on one KVPool shared by two batches (as the server's prefill and running batches): rows join
    (on one of four states, some text-only), write tokens, move between the caches and leave at random; every
    block is held by exactly its holders all along, and nothing is held after."""
    import random

    from vlcache.decode.rows import Prefix, RowsCache

    rng = random.Random(28)
    config = engine.model.config
    first = RowsCache(config, "cpu", torch.float32)
    second = RowsCache(config, "cpu", torch.float32, pool=first.pool)
    caches = [first, second]

    def prefix(tokens):
        kv = [(torch.randn(1, heads, tokens, dim), torch.randn(1, heads, tokens, dim)) for heads, dim in first._shapes]
        return Prefix(kv, tokens)

    states = [prefix(n) for n in (0, 16, 37, 50)]
    (kind, pool), = first.pool.pools.items()
    for _ in range(1000):
        cache = rng.choice(caches)
        roll = rng.random()
        if cache.rows and roll < 0.4:
            cache.remove(rng.randrange(cache.rows))
        elif cache.rows and roll < 0.55:
            other = caches[1 - caches.index(cache)]
            slot = rng.randrange(cache.rows)
            other.adopt(cache, slot)
            cache.remove(slot)
        elif cache.rows < 12:
            cache.add(rng.choice(states))
        if cache.rows:
            grow_randomly(cache, rng)
        holders = block_holders(caches, first.pool, kind)
        assert {b: r for b, r in enumerate(pool.refs) if r} == holders and pool.used == len(holders)
    for cache in caches:
        cache.close()
    assert pool.used == 0 and set(pool.refs) == {0} and not first.pool.held


def block_holders(caches, pool, kind, holders: dict | None = None) -> dict:
    """Block -> how many holders reference it: the rows of `caches`, the states `pool` holds, and `holders` (e.g. a
    prefix tree's); the NULL block left out. A pool's refcounts must equal exactly this."""
    holders = dict(holders or {})
    for cache in caches:
        for row in cache.kinds[kind].rows:
            for block in row:
                holders[block] = holders.get(block, 0) + 1
    for held in pool.held.values():
        for block in held.blocks[kind]:
            holders[block] = holders.get(block, 0) + 1
    holders.pop(NULL, None)
    return holders


def grow_randomly(cache, rng) -> list[int]:
    """Every row of `cache` takes 0 to 4 new positions at once (as a prefill piece or a step would); the counts."""
    counts = [rng.randrange(0, 5) for _ in range(cache.rows)]
    width = max(counts + [1])
    logical = torch.tensor([[n + j for j in range(width)] for n in cache.book.next_logical()])
    with torch.inference_mode():
        cache.begin(logical, counts)
    return counts
