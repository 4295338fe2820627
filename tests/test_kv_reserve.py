"""Issue 28 review: on CUDA the server's K/V pool is reserved once at its bound (--kv-memory), so it never grows and
no CUDA graph is recorded at request time for a new block count. Tested on the CPU by asking for a reserved pool."""

import threading

import pytest
import torch

from conftest import SYSTEM, photo
from vlcache.decode import kvpool
from vlcache.decode.blocks import RESERVED, PoolFull
from vlcache.decode.kvpool import KVPool

FULL, WINDOW = (None, None), (4, None)


def _tensors(pool: KVPool) -> dict:
    """Per layer and K/V: where its tensor lives and how many blocks it has."""
    return {(i, side): (t.data_ptr(), t.shape[0]) for side, tensors in (("k", pool.keys), ("v", pool.values))
            for i, t in tensors.items()}


def test_a_reserved_pool_is_made_at_its_bound_once_never_grows_and_still_fails_beyond_it_and_control():
    """Two layer kinds (blocks of 1 KiB and 2 KiB) under a bound of 40 blocks of each: the reserved pool's tensors
    are made at 40 blocks with the first block and stay the same tensors through allocations, releases and what
    would have been growth; the 39th block of a kind is PoolFull. Control: the doubling pool's tensors change."""
    for reserve in (True, False):
        pool = KVPool({FULL: [0], WINDOW: [1]}, [(1, 8), (2, 8)], 16, "cpu", torch.float32, reserve=reserve)
        pool.limit_bytes = 40 * (pool.block_bytes(FULL) + pool.block_bytes(WINDOW)) + 100  # set later, as a server may
        seen, changes, held = {}, 0, {FULL: [], WINDOW: []}
        for step in range(120):  # joins and leaves: mostly allocate, every third step release one
            kind = FULL if step % 2 == 0 else WINDOW
            if step % 3 == 2 and held[kind]:
                pool.pools[kind].release(held[kind].pop(0))
            else:
                try:
                    held[kind].append(pool.pools[kind].allocate())
                except PoolFull:
                    assert reserve and len(held[kind]) == 40 - RESERVED, (reserve, kind, len(held[kind]))
            now = _tensors(pool)
            changes += sum(1 for key, value in now.items() if key in seen and seen[key] != value)
            seen.update(now)
        if reserve:
            assert changes == 0 and {blocks for _, blocks in seen.values()} == {40} and len(seen) == 4
            assert all(p.capacity == 40 for p in pool.pools.values())
            assert sum(p.capacity * pool.block_bytes(k) for k, p in pool.pools.items()) <= pool.limit_bytes
            with pytest.raises(PoolFull):  # every block in use: beyond the bound is refused as before
                for _ in range(41):
                    held[FULL].append(pool.pools[FULL].allocate())
            assert _tensors(pool) == seen
        else:
            assert changes > 0, "the doubling pool never changed its tensors: the test shows nothing"


def test_a_reserved_pool_needs_a_bound_and_only_cuda_reserves():
    pool = KVPool({FULL: [0]}, [(1, 8)], 16, "cpu", torch.float32, reserve=True)
    with pytest.raises(ValueError, match="a reserved K/V pool needs limit_bytes"):
        pool.pools[FULL].allocate()
    assert kvpool.reserves(torch.device("cuda"), 2**20) and kvpool.reserves("cuda:0", 2**20)
    assert not kvpool.reserves("cpu", 2**20) and not kvpool.reserves("cuda", None)
    layout = KVPool({FULL: [0]}, [(1, 8)], 16, torch.device("cuda"), torch.float16)  # no tensor made: no GPU needed
    made = kvpool.serving_pool(layout, 2**20)
    assert made.reserve and made.limit_bytes == 2**20 and made.kind_layers == layout.kind_layers and not made.keys
    assert not kvpool.serving_pool(KVPool({FULL: [0]}, [(1, 8)], 16, "cpu"), 2**20).reserve


def test_a_server_on_a_reserved_pool_takes_it_at_start_queues_what_does_not_fit_and_never_grows_it(
        engine, astronaut_state, monkeypatch, tmp_path):
    """The server's pool reserved (as on CUDA) at a --kv-memory that holds either of two questions about two states
    but not both: its tensors exist at the bound when the service starts, before any request; the second question
    waits in the queue, both answer as alone, and the tensors are the same ones from start to end."""
    from churn import job_for
    from test_paged import QUESTIONS, _needs

    from vlcache.serving.server import ServeOptions
    from vlcache.serving.service import Service

    monkeypatch.setattr(kvpool, "reserves", lambda device, limit_bytes: limit_bytes is not None)
    other = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)
    cases = [(astronaut_state, QUESTIONS[0], "astronaut"), (other, QUESTIONS[1], "rocket")]
    jobs = [job_for(engine, state, q, 16, key) for state, q, key in cases]
    fixed, needs = _needs(engine, jobs)
    bound = fixed + sum(own + state for own, state in needs) - 1
    service = Service(engine, ServeOptions(cache_dir=tmp_path / "states", memory_budget=2**30, max_batch=8,
                                           prefill_chunk=512, kv_memory=bound))
    scheduler = service.scheduler
    try:
        pool = scheduler._pool
        start = _tensors(pool)
        assert pool.reserve and {blocks for _, blocks in start.values()} == {pool.reserved_blocks()}
        assert pool.reserved_blocks() == bound // sum(pool.block_bytes(k) for k in pool.kind_layers) > RESERVED
        blocker, blocking = threading.Event(), threading.Event()
        scheduler.call(lambda: (blocking.set(), blocker.wait()))
        assert blocking.wait(30)
        for job, _, _ in jobs:
            scheduler.submit(job)
        blocker.set()
        most, seen = 0, []
        while not all(done.is_set() for _, _, done in jobs):
            running, tensors = scheduler.call(lambda: (len(scheduler._running), _tensors(scheduler._pool))).result(60)
            most, _ = max(most, running), seen.append(tensors)
        assert scheduler._pool is pool and all(t == start for t in seen) and _tensors(pool) == start
        assert most == 1  # the second question waited: blocks beyond the bound are queued, as without reserving
        for (state, question, _), (_, events, _) in zip(cases, jobs):
            kind, answer = events[-1]
            assert kind == "done", answer
            assert answer.token_ids == engine.ask(state, question, max_new_tokens=16, temperature=0).token_ids
    finally:
        service.close()


def test_a_cpu_server_makes_no_pool_at_start(engine, tmp_path):
    """Control for the above: on the CPU nothing is reserved at start (the pool grows by doubling when used)."""
    from vlcache.serving.server import ServeOptions
    from vlcache.serving.service import Service

    service = Service(engine, ServeOptions(cache_dir=tmp_path / "states", memory_budget=2**30, kv_memory=2**30))
    try:
        assert service.scheduler._pool is None
    finally:
        service.close()


def test_writing_a_state_into_a_nearly_full_reserved_pool_never_grows_it_into_the_bound_s_slack():
    """The bound is 40 blocks of each kind plus one FULL block's bytes (the floor's remainder). A state written when
    fewer blocks are free than it takes plus the headroom (make_free's `at_least`) must not grow the reserved pool
    into that remainder: growing copies the kind's tensors (on CUDA twice its memory for a moment, and a new block
    count for the compiled step), and a kind past its share leaves another kind short of its own. The state still
    fits in the free blocks and reads back."""
    from vlcache.decode.rows import Prefix

    pool = KVPool({FULL: [0], WINDOW: [1]}, [(1, 8), (2, 8)], 16, "cpu", torch.float32, reserve=True)
    pool.limit_bytes = 40 * (pool.block_bytes(FULL) + pool.block_bytes(WINDOW)) + pool.block_bytes(FULL)
    pool.ensure()
    start = _tensors(pool)
    assert pool.reserved_blocks() == 40 and {blocks for _, blocks in start.values()} == {40}
    taken = [pool.pools[FULL].allocate() for _ in range(30)]  # 8 FULL blocks left free
    kv = [(torch.randn(1, 1, 80, 8), torch.randn(1, 1, 80, 8)), (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))]
    chain = pool.hold(Prefix(kv, 80)).blocks[FULL]  # 5 FULL blocks, fewer than 5 + PREFIX_HEADROOM free
    assert len(taken) == 30 and len(chain) == 5
    assert torch.equal(torch.cat([pool.keys[0][b] for b in chain], dim=1), kv[0][0][0])
    assert [p.capacity for p in pool.pools.values()] == [40, 40] and _tensors(pool) == start
