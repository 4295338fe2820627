"""Kept conversations as block chains in one prefix tree (issue 28, item 2): one copy, reused, evicted safely."""

import dataclasses
import random
import threading
import time

import torch
from conftest import photo
from test_paged import block_holders, grow_randomly

from vlcache.decode.blocks import NULL, blocks_for
from vlcache.decode.radix import RadixTree
from vlcache.engine import GenerationOptions
from vlcache.serving.scheduler import Job, Scheduler

N = 8


def _job(engine, state, history, new_ids, max_new_tokens=N, root="", keep=None, group=None):
    """A Job as the server makes one for `state`: continuing from `history` (the state's ids, then maybe a kept
    conversation's), kept under `root` (its blocks then come from the prefix tree)."""
    events, finished = [], threading.Event()

    def emit(kind, value):
        events.append((kind, value))
        if kind != "delta":
            finished.set()

    job = Job(kv=state.kv, history=history, new_ids=new_ids, rope_delta=int(state.rope_deltas.view(-1)[0]),
              options=GenerationOptions(max_new_tokens=max_new_tokens, temperature=0), emit=emit,
              group=group or f"g{history.shape[1]}", keep=keep, root=root, base=state.num_tokens)
    return job, events, finished


def _answer(events):
    kind, answer = events[-1]
    assert kind == "done", answer
    return answer


def _alone(engine, state, ids, max_new_tokens=N):
    """The answer of a row that prefills everything after the state itself (no tree)."""
    scheduler = Scheduler(engine)
    try:
        job, events, finished = _job(engine, state, state.input_ids, ids[:, state.num_tokens:], max_new_tokens)
        scheduler.submit(job)
        assert finished.wait(60)
        return _answer(events)
    finally:
        scheduler.stop()


def _held(scheduler):
    """Per block of the (single) full kind: its holders (rows of the running batch, prefixes written or
    referenced, the tree's nodes), to compare with the pool's counts."""
    pool = scheduler._pool
    (kind,) = pool.kind_layers
    holders = {}
    batches = [scheduler._batch] if scheduler._batch is not None else []
    for batch in batches:
        for row in batch.cache.kinds[kind].rows:
            for block in row:
                holders[block] = holders.get(block, 0) + 1
    for held in pool.held.values():
        for block in held.blocks[kind]:
            holders[block] = holders.get(block, 0) + 1
    for block, count in scheduler._radix.held()[kind].items():
        holders[block] = holders.get(block, 0) + count
    holders.pop(NULL, None)
    return holders, pool.pools[kind]


def _first_turn(engine, scheduler, state, question):
    """A first question kept under the root "astronaut": the kept ids and their tree node."""
    kept = []
    ids = engine.question_ids(state.metadata.messages, question)
    job, events, finished = _job(engine, state, state.input_ids, ids, root="astronaut",
                                 keep=lambda ids, node, start: kept.append((ids, node)))
    scheduler.submit(job)
    assert finished.wait(60)
    _answer(events)
    ((conversation, node),) = kept
    return conversation, node


def _hold_thread(scheduler):
    blocker, blocking = threading.Event(), threading.Event()
    scheduler.call(lambda: (blocking.set(), blocker.wait()))
    assert blocking.wait(30)
    return blocker


def test_a_continuation_shared_by_two_follow_ups_is_one_copy_and_they_answer_as_alone(engine, astronaut_state):
    state = astronaut_state
    follow = [engine.processor.tokenizer(text, return_tensors="pt")["input_ids"] for text in
              (" And the colours?", " Is it day or night, and why?")]
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=512)
    try:
        conversation, node = _first_turn(engine, scheduler, state, "What is in the picture?")
        length = conversation.shape[1]
        assert node.alive and length > state.num_tokens + 16
        kept_blocks = scheduler.call(lambda: scheduler._radix.blocks).result(60)
        assert kept_blocks == blocks_for(length, 16)  # the state's blocks and the conversation's, once
        blocker = _hold_thread(scheduler)
        jobs = [_job(engine, state, conversation, ids, max_new_tokens=16, root="astronaut", group="conv") for ids in follow]
        for job, _, _ in jobs:
            scheduler.submit(job)
        seen = []

        def look():
            if len(scheduler._running) == 2 and not seen:
                holders, pool = _held(scheduler)
                assert {b: r for b, r in enumerate(pool.refs) if r} == holders and pool.used == len(holders)
                (tables,) = scheduler._batch.cache.kinds.values()
                _, chain, _ = scheduler._radix.match("astronaut", conversation[0].tolist())
                (chain,) = chain.values()
                whole = length // 16
                own = 0
                for row, lengths in zip(tables.rows, scheduler._batch.cache.book.lengths):
                    assert row[:whole] == chain[:whole]  # the kept conversation's blocks, referenced
                    own += blocks_for(lengths, 16) - whole
                seen.append((pool.used, kept_blocks + own))

        blocker.set()
        while not seen and not all(done.is_set() for _, _, done in jobs):
            scheduler.call(look).result(60)
        assert seen and seen[0][0] == seen[0][1], seen  # no copy of the conversation: the tree's and their own
        assert all(done.wait(60) for _, _, done in jobs)
        for ids, (_, events, _) in zip(follow, jobs):
            answer = _answer(events)
            assert answer.cached_tokens == length
            assert answer.token_ids == _alone(engine, state, torch.cat([conversation, ids], dim=1), 16).token_ids
        holders, pool = scheduler.call(lambda: _held(scheduler)).result(60)
        assert pool.used == len(holders) == scheduler._radix.blocks  # after: only the tree's
    finally:
        scheduler.stop()


def test_evicting_a_conversation_while_rows_use_it_they_finish_exactly_and_its_blocks_are_freed_after(engine, astronaut_state):
    state = astronaut_state
    ids = engine.processor.tokenizer(" Tell me more.", return_tensors="pt")["input_ids"]
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=512)
    try:
        conversation, node = _first_turn(engine, scheduler, state, "Describe the colours in a few words.")
        blocker = _hold_thread(scheduler)
        job, events, finished = _job(engine, state, conversation, ids, max_new_tokens=16, root="astronaut")
        scheduler.submit(job)
        evicted = []

        def evict():
            if scheduler._running and not evicted:
                assert scheduler._radix.reclaim() is False  # every leaf is in use: nothing the pool may take
                evicted.append(scheduler._radix.evict())  # forced (as a deleted state's): references dropped
                assert scheduler._radix.blocks == 0 and scheduler._pool.pools[next(iter(scheduler._pool.pools))].used > 0

        blocker.set()
        while not evicted and not finished.is_set():
            scheduler.call(evict).result(60)
        assert evicted == [0] and not node.alive  # nothing freed while the row ran
        assert finished.wait(60)
        assert _answer(events).token_ids == _alone(engine, state, torch.cat([conversation, ids], dim=1), 16).token_ids
        used = scheduler.call(lambda: (scheduler._pool.stats()["full"]["used"], len(scheduler._pool.held))).result(60)
        assert used == (0, 0)
    finally:
        scheduler.stop()


def test_a_conversation_the_tree_no_longer_holds_is_prefilled_again_from_the_state(engine, astronaut_state):
    """Evicted between the request's lookup and its row's start: the row starts from the state and prefills the
    rest (exact; fewer cached tokens)."""
    state = astronaut_state
    ids = engine.processor.tokenizer(" Tell me more.", return_tensors="pt")["input_ids"]
    scheduler = Scheduler(engine, prefill_chunk=512)
    try:
        conversation, _ = _first_turn(engine, scheduler, state, "What would you title this photograph?")
        scheduler.call(lambda: scheduler._radix.evict()).result(60)
        job, events, finished = _job(engine, state, conversation, ids, root="astronaut")
        scheduler.submit(job)
        assert finished.wait(60)
        answer = _answer(events)
        assert answer.cached_tokens == state.num_tokens
        assert answer.token_ids == _alone(engine, state, torch.cat([conversation, ids], dim=1)).token_ids
    finally:
        scheduler.stop()


def test_n_choices_reference_their_leaders_blocks(engine, astronaut_state):
    state = astronaut_state
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=512)
    try:
        blocker = _hold_thread(scheduler)
        ids = engine.question_ids(state.metadata.messages, "What is in the picture? Answer at length.")
        leader, events, finished = _job(engine, state, state.input_ids, ids, max_new_tokens=12)
        choices = [(leader, events, finished)]
        for _ in range(2):
            more, done = [], threading.Event()
            emit = lambda kind, value, more=more, done=done: (more.append((kind, value)), kind != "delta" and done.set())
            choices.append((dataclasses.replace(leader, emit=emit, leader=leader, cancelled=threading.Event()), more, done))
        for job, _, _ in choices:
            scheduler.submit(job)
        seen = []
        prompt = state.num_tokens + ids.shape[1]

        def look():
            if len(scheduler._running) == 3 and not seen:
                holders, pool = _held(scheduler)
                assert {b: r for b, r in enumerate(pool.refs) if r} == holders
                (tables,) = scheduler._batch.cache.kinds.values()
                rows = tables.rows
                whole = prompt // 16
                assert rows[1][:whole] == rows[0][:whole] == rows[2][:whole]
                own = [set(row[whole:]) for row in rows]
                assert not (own[0] & own[1]) and not (own[1] & own[2]) and not (own[0] & own[2])
                lengths = scheduler._batch.cache.book.lengths
                state_blocks, copied_from = blocks_for(state.num_tokens, 16), state.num_tokens // 16
                seen.append((pool.used, state_blocks + blocks_for(prompt, 16) - copied_from
                             + sum(blocks_for(n, 16) - whole for n in lengths)))

        blocker.set()
        while not seen and not all(done.is_set() for _, _, done in choices):
            scheduler.call(look).result(60)
        # The state's blocks and the leader's prompt's once (each partly filled last one copied by whoever
        # writes into it), each row's own after the prompt: no choice holds a copy of the prompt.
        assert seen and seen[0][0] == seen[0][1], seen
        assert all(done.wait(60) for _, _, done in choices)
        alone = engine.ask(state, "What is in the picture? Answer at length.", max_new_tokens=12, temperature=0).token_ids
        assert [_answer(events).token_ids for _, events, _ in choices] == [alone] * 3
        assert scheduler.call(lambda: scheduler._pool.stats()["full"]["used"]).result(60) == 0
    finally:
        scheduler.stop()


def test_refcounts_return_to_zero_after_1000_random_joins_leaves_keeps_and_evictions(engine):
    """Rows on two caches of one pool start from states or from conversations the tree keeps, write tokens,
    move, leave (some kept in the tree) and the tree evicts at random: every block's count is its holders'
    all along, and after everything leaves and the tree is cleared, zero."""
    from vlcache.decode.rows import Prefix, RowsCache

    rng = random.Random(2828)
    config = engine.model.config
    first = RowsCache(config, "cpu", torch.float32)
    second = RowsCache(config, "cpu", torch.float32, pool=first.pool)
    caches, ids = [first, second], {id(first): [], id(second): []}  # per cache, per slot: (root, token ids)
    tree = RadixTree(first.pool)
    (kind, pool), = first.pool.pools.items()
    layers = len(first._shapes)

    def state(tokens):
        return Prefix([(torch.randn(1, h, tokens, d), torch.randn(1, h, tokens, d)) for h, d in first._shapes], tokens)

    states = {f"s{n}": (state(n), list(range(1000 * n, 1000 * n + n))) for n in (16, 37, 50)}
    kept = []  # (root, ids) inserted
    for _ in range(1000):
        cache = rng.choice(caches)
        rows = ids[id(cache)]
        roll = rng.random()
        if cache.rows and roll < 0.35:
            slot = rng.randrange(cache.rows)
            root, row_ids = rows[slot]
            if rng.random() < 0.5:
                chain = {k: tables.rows[slot][: blocks_for(len(row_ids), 16)] for k, tables in cache.kinds.items()}
                tree.insert(root, row_ids, chain)
                kept.append((root, list(row_ids)))
            cache.remove(slot)
            rows[slot] = rows[-1]
            rows.pop()
        elif cache.rows and roll < 0.45:
            other = caches[1 - caches.index(cache)]
            slot = rng.randrange(cache.rows)
            other.adopt(cache, slot)
            ids[id(other)].append(rows[slot])
            cache.remove(slot)
            rows[slot] = rows[-1]
            rows.pop()
        elif roll < 0.55:
            tree.evict(rng.randrange(1, 4), busy_too=rng.random() < 0.5)
        elif cache.rows < 12:
            root = rng.choice(sorted(states))
            prefix, base = states[root]
            wanted = [k for k in kept if k[0] == root]
            got = 0
            if wanted and rng.random() < 0.6:
                row_ids = rng.choice(wanted)[1][: rng.randrange(len(base), len(rng.choice(wanted)[1]) + 1)]
                got, chains, _ = tree.match(root, row_ids)
            if got >= len(base):
                blocks = {k: chain[: blocks_for(got, 16)] for k, chain in chains.items()}
                cache.add(Prefix([(None, None)] * layers, got, blocks=blocks))
                rows.append((root, list(row_ids[:got])))
            else:
                cache.add(prefix)
                rows.append((root, list(base)))
        if cache.rows:
            counts = grow_randomly(cache, rng)
            for slot, n in enumerate(counts):
                rows[slot][1].extend(rng.randrange(5) for _ in range(n))  # few distinct ids: shared runs
        holders = block_holders(caches, first.pool, kind, tree.held()[kind])
        assert {b: r for b, r in enumerate(pool.refs) if r} == holders and pool.used == len(holders)
    assert kept and tree.blocks
    for cache in caches:
        cache.close()
    tree.clear()
    assert pool.used == 0 and set(pool.refs) == {0} and not first.pool.held and tree.blocks == 0


def test_a_pool_at_its_bound_takes_back_the_least_recently_used_kept_blocks(engine):
    """Allocating beyond --kv-memory evicts the tree's least recently used unused leaves, never a leaf in use."""
    from vlcache.decode.blocks import RESERVED, PoolFull
    from vlcache.decode.rows import Prefix, RowsCache

    config = engine.model.config
    cache = RowsCache(config, "cpu", torch.float32)
    pool = cache.pool
    (kind, blocks), = pool.pools.items()
    pool.limit_bytes = (RESERVED + 6) * pool.block_bytes(kind)
    tree = RadixTree(pool)
    pool.set_reclaim(tree.reclaim)
    layers = len(cache._shapes)
    chains = []
    for n in range(3):  # three kept conversations of two blocks each: the pool is full
        chain = [blocks.allocate(), blocks.allocate()]
        tree.insert("r", [n] * 32, {kind: chain})
        for block in chain:
            blocks.release(block)  # the tree's references only
        chains.append(chain)
    assert blocks.used == 6
    tree.match("r", [2] * 32)  # used recently; then a row starts on conversation 0
    cache.add(Prefix([(None, None)] * layers, 32, blocks={kind: tree.match("r", [0] * 32)[1][kind]}))
    taken = [blocks.allocate() for _ in range(4)]  # leaves, least recently used first: conversation 1, then 2
    assert taken == [chains[1][1], chains[1][0], chains[2][1], chains[2][0]]
    try:
        blocks.allocate()  # conversation 0 is in use: nothing left to take
    except PoolFull:
        pass
    else:
        raise AssertionError("a block in use was taken")
    assert tree.match("r", [0] * 32)[0] == 32 and tree.match("r", [1] * 32)[0] == tree.match("r", [2] * 32)[0] == 0


def test_the_server_keeps_no_copy_and_a_regenerate_reuses_the_conversation(engine, tmp_path):
    from test_conversation import reference_conversation
    from test_server import LiveServer, image_messages

    live = LiveServer(engine, tmp_path / "states")
    try:
        q1, q2 = "What objects are visible in this image?", "What colors dominate the scene?"
        messages = image_messages("astronaut.png", q1)
        first = live.client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
        a1 = first.choices[0].message.content
        messages += [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
        second = live.client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
        scheduler = live.service.scheduler
        blocks = scheduler.call(lambda: scheduler._radix.blocks).result(60)
        again = live.client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
        expected, _ = reference_conversation(engine, photo("astronaut.png"), [(q1, a1)], q2, N)
        text = engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
        assert second.choices[0].message.content == again.choices[0].message.content == text
        # The regenerate reuses the kept conversation up to its last message (more than the first turn's prompt).
        assert again.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens_details.cached_tokens
        assert again.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
        assert scheduler.call(lambda: scheduler._radix.blocks).result(60) == blocks  # kept once
        # /metrics: the pool's blocks per layer kind, as the pool counts them (nothing runs now).
        gauges = _kv_gauges(live)
        stats = scheduler.call(lambda: scheduler._pool.stats()["full"]).result(60)
        assert gauges == {"used": stats["used"], "free": stats["free"], "shared": stats["shared"], "kept": blocks}
        assert gauges["used"] == blocks > 0  # only the tree holds blocks between requests
        assert gauges["shared"] == 0  # the conversations share blocks as tree nodes, each held once
        store = live.service.store
        (state_key,) = [k for k in store._hot if ":" not in k]
        assert store.hot_bytes == store._hot[state_key].kv_bytes  # the store holds the image state only
        assert all(not hasattr(c, "suffix_kv") for kept in store._continuations.values() for c in kept)
        # Deleting the state (made for a chat: not shared) is not open to clients; the tree forgets it when it goes.
        store.delete(state_key)
        scheduler.call(lambda: None).result(60)
        assert scheduler.call(lambda: scheduler._radix.blocks).result(60) == 0
        assert scheduler.call(lambda: scheduler._pool.stats()["full"]["used"]).result(60) == 0
        assert _kv_gauges(live)["used"] == _kv_gauges(live)["kept"] == 0
    finally:
        live.close()


def test_metrics_count_shared_blocks_while_rows_run(engine, tmp_path):
    """Two questions about one image decoding together: /metrics shows the state's blocks shared."""
    from test_server import LiveServer, image_messages

    live = LiveServer(engine, tmp_path / "states")
    try:
        scheduler = live.service.scheduler
        seen = []
        original = scheduler.stats.batch_size

        def watch(rows):  # on the model thread, after a step of both rows: read /metrics from another thread
            if rows == 2 and not seen:
                result = []
                reader = threading.Thread(target=lambda: result.append(_kv_gauges(live)))
                reader.start()
                reader.join(30)
                seen.append((result[0], scheduler._pool.stats()["full"]))
            original(rows)

        live.client.chat.completions.create(model="any", max_tokens=2, temperature=0,
                                            messages=image_messages("rocket.jpg", "Hello?"))  # the state, made
        scheduler.stats.batch_size = watch
        blocker = _hold_thread(scheduler)
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(live.client.chat.completions.create, model="any", max_tokens=N, temperature=0,
                                   messages=image_messages("rocket.jpg", q)) for q in ("What is it?", "Which colour?")]
            deadline = time.time() + 30
            while scheduler._inbox.qsize() < 2 and time.time() < deadline:
                time.sleep(0.05)
            blocker.set()
            [f.result() for f in futures]
        (gauges, stats), = seen
        assert gauges["used"] == stats["used"] and gauges["shared"] == stats["shared"] and gauges["free"] == stats["free"]
        assert gauges["shared"] >= 1  # the state's blocks: referenced by both rows
    finally:
        live.close()


def _kv_gauges(live) -> dict:
    """The full-attention kind's vlcache_kv_blocks gauges from the server's /metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(live.url + "/metrics").read().decode()
    found = re.findall(r'^vlcache_kv_blocks\{kind="full",state="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {state: int(float(value)) for state, value in found}


def test_a_kind_grows_within_the_bound_after_another_kind_emptied_and_control():
    """Two layer kinds under one bound: the full kind grew and emptied; the window kind then needs the bytes.
    The full kind's unused top is given back, so the window kind's blocks fit (control: without that, PoolFull
    with the bound not reached)."""
    from vlcache.decode.blocks import RESERVED, PoolFull
    from vlcache.decode.kvpool import KVPool

    full, window = (None, None), (4, None)

    def pool(trim: bool) -> KVPool:
        made = KVPool({full: [0], window: [1]}, [(1, 8), (1, 8)], 16, "cpu", torch.float32)
        made.limit_bytes = 40 * made.block_bytes(full)  # both kinds' blocks are the same size here
        if not trim:
            made.pools[window].make_room = lambda: None
        return made

    for trim in (True, False):
        kv = pool(trim)
        taken = [kv.pools[full].allocate() for _ in range(30)]
        held = taken[0]  # one low block stays in use
        for block in taken[1:]:
            kv.pools[full].release(block)
        try:
            got = [kv.pools[window].allocate() for _ in range(30)]  # 31 in use of 40: within the bound
        except PoolFull:
            assert not trim, "the window kind could not grow with the bound not reached"
            continue
        assert trim, "the control grew anyway: the test shows nothing"
        assert kv.pools[full].refs[held] == 1 and kv.keys[0].shape[0] == kv.pools[full].capacity == held + 1
        assert len(set(got)) == 30 and kv.keys[1].shape[0] == kv.pools[window].capacity
        capacity = sum(p.capacity * kv.block_bytes(k) for k, p in kv.pools.items())
        assert capacity <= kv.limit_bytes and kv.pools[window].capacity > RESERVED + 30 - 1


def test_kept_conversations_are_evicted_to_stay_within_the_servers_memory_budget(engine, astronaut_state):
    """The tree keeps at most what the budget allows (least recently used leaves go first), a row's blocks
    excepted; unbounded it keeps them all (control)."""
    state = astronaut_state
    questions = ["What is in the picture?", "Describe the colours in a few words.", "Is it day or night?"]
    everything = None
    for bounded in (False, True):
        scheduler = Scheduler(engine, prefill_chunk=512)
        try:
            if bounded:
                scheduler.call(lambda: scheduler._layout()).result(60)
                block = scheduler._pool.block_bytes(next(iter(scheduler._pool.kind_layers)))
                scheduler.kept_budget = lambda: (everything - 1) * block
            nodes = [_first_turn(engine, scheduler, state, q)[1] for q in questions]
            kept = scheduler.call(lambda: (scheduler._radix.blocks, scheduler._pool.stats()["full"]["used"])).result(60)
            if not bounded:
                assert all(node.alive for node in nodes) and kept[0] == kept[1] > 1
                everything = kept[0]
            else:
                assert kept[0] <= everything - 1 and kept[1] == kept[0]  # what went was freed
                assert nodes[-1].alive and nodes[1].alive and not nodes[0].alive  # the least recently used went
        finally:
            scheduler.stop()


def test_admission_counts_the_tail_the_tree_lost_for_every_row_of_the_group(engine, astronaut_state):
    """The tree lost a kept conversation's last blocks: each follow-up writes that tail itself, so each is counted
    with it. Under a --kv-memory one block short of both rows together, they run one after the other and both
    answer (before: both admitted on the history's count, the pool ran out mid-decode and both failed)."""
    state = astronaut_state
    question = "What is in the picture and what colours does it have?"
    follow = [engine.processor.tokenizer(t, return_tensors="pt")["input_ids"] for t in (" And?", " Why?")]
    sizing = Scheduler(engine, prefill_chunk=512)
    try:
        conversation, _ = _first_turn(engine, sizing, state, question)
        pool = sizing._pool
        (kind,) = pool.kind_layers
        size, block = pool.block_size, pool.block_bytes(kind)
    finally:
        sizing.stop()
    own = [blocks_for(conversation.shape[1] + ids.shape[1] + 16, size) - state.num_tokens // size for ids in follow]
    kv_memory = (2 + blocks_for(state.num_tokens, size) + sum(own) - 1) * block
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=512, kv_memory=kv_memory)
    try:
        assert torch.equal(_first_turn(engine, scheduler, state, question)[0], conversation)
        assert scheduler.call(lambda: scheduler._radix.evict(3)).result(60) > 0  # the tree now holds < the state
        blocker = _hold_thread(scheduler)
        jobs = [_job(engine, state, conversation, ids, max_new_tokens=16, root="astronaut", group="conv")
                for ids in follow]
        for job, _, _ in jobs:
            scheduler.submit(job)
        blocker.set()
        for _, events, finished in jobs:
            assert finished.wait(120)
            assert len(_answer(events).token_ids) == 16
    finally:
        scheduler.stop()


def test_a_row_the_pool_cannot_give_a_block_fails_alone(engine, astronaut_state):
    """Two rows on one state in a pool one block short of both (admission off, as if it had miscounted): the
    first to need a block it cannot have fails with PoolFull; the other gets its blocks and answers."""
    state = astronaut_state
    questions = [engine.question_ids(state.metadata.messages, q) for q in ("What is this?", "Where is it?")]
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=512, kv_memory=10**9)
    try:
        pool = scheduler.call(lambda: scheduler._layout()).result(60)
        (kind,) = pool.kind_layers
        size, block = pool.block_size, pool.block_bytes(kind)
        history = state.num_tokens
        own = [blocks_for(history + ids.shape[1] + 32, size) - history // size for ids in questions]
        pool.limit_bytes = (2 + blocks_for(history, size) + sum(own) - 1) * block
        scheduler.kv_memory = None  # every row admitted: only the pool's bound stops them
        blocker = _hold_thread(scheduler)
        jobs = [_job(engine, state, state.input_ids, ids, max_new_tokens=32, group="one") for ids in questions]
        for job, _, _ in jobs:
            scheduler.submit(job)
        blocker.set()
        ends = []
        for _, events, finished in jobs:
            assert finished.wait(120)
            ends.append(events[-1])
        assert sorted(kind for kind, _ in ends) == ["done", "error"]
        ((_, message),) = [end for end in ends if end[0] == "error"]
        assert "PoolFull" in message
        ((ids, (_, answer)),) = [(ids, end) for ids, end in zip(questions, ends) if end[0] == "done"]
        assert answer.token_ids == _alone(engine, state, torch.cat([state.input_ids, ids], dim=1), 32).token_ids
    finally:
        scheduler.stop()


def test_records_of_conversations_the_tree_dropped_are_swept_and_live_ones_capped(tmp_path, monkeypatch):
    """A record keeps its ids and node: those whose node died (evicted, or a failed forward's abandoned tree) go
    at the next record, under any image key; live ones are capped, the least recently recorded key's first."""
    from vlcache.serving import store as store_module
    from vlcache.serving.store import Continuation, StateStore

    class Node:
        alive = True

    store = StateStore(tmp_path / "cache", 10**9, "f" * 32, "cpu")
    nodes = [Node() for _ in range(50)]
    for i, node in enumerate(nodes):
        store.add_continuation(f"{i:064x}", Continuation(input_ids=torch.full((1, 20), i), node=node))
    assert sum(len(records) for records in store._continuations.values()) == 50  # control: all alive, all kept
    for node in nodes:
        node.alive = False
    store.add_continuation("f" * 64, Continuation(input_ids=torch.zeros(1, 5, dtype=torch.long), node=Node()))
    assert list(store._continuations) == ["f" * 64] and len(store._continuations["f" * 64]) == 1

    monkeypatch.setattr(store_module, "CONTINUATIONS_KEPT", 8)
    for i in range(10):
        store.add_continuation("e" * 64, Continuation(input_ids=torch.full((1, 3), i), node=Node()))
    records = store._continuations
    assert sum(len(r) for r in records.values()) == 8 and "f" * 64 not in records  # the older key's went first
    assert [int(c.input_ids[0, 0]) for c in records["e" * 64]] == list(range(2, 10))


def test_kv_stats_between_a_pool_and_its_tree_being_set_or_cleared(engine, astronaut_state):
    """/health reads the pool and the tree from another thread: the pool is set before its tree and cleared
    after it, and a tree seen without its pool still reports (before: KeyError, a 500)."""
    changes = []

    class Recording(Scheduler):
        def __setattr__(self, name, value):
            if name in ("_pool", "_radix") and getattr(self, name, None) is not value:
                changes.append((name, value is None))
            super().__setattr__(name, value)

    scheduler = Recording(engine, prefill_chunk=512)
    try:
        _first_turn(engine, scheduler, astronaut_state, "What is in the picture?")
        stats = scheduler.kv_stats()
        assert stats["blocks"]["full"]["kept"] == scheduler._radix.blocks > 0  # control: the tree's blocks
        pool, scheduler._pool = scheduler._pool, None  # what another thread may see between the two changes
        try:
            stats = scheduler.kv_stats()
        finally:
            scheduler._pool = pool
        assert stats["blocks"] == {"full": {"kept": scheduler._radix.blocks}} and stats["used_bytes"] == 0
        changes.clear()
        scheduler.call(lambda: (scheduler._fail_rows("a failed forward"), scheduler._layout())).result(60)
        assert changes == [("_radix", True), ("_pool", True), ("_pool", False), ("_radix", False)]
    finally:
        scheduler.stop()


def test_fit_and_reclaim_visit_about_the_leaves_they_evict_not_every_leaf_each_time():
    """2000 one-block conversations, the 5 oldest used by rows: 100 reclaims then a fit to half the bytes take
    the least recently used unused leaves and look at a bounded number of leaves (before: every leaf per
    eviction, 200,000 visits for the reclaims alone)."""
    from vlcache.decode.kvpool import KVPool

    kind = (None, None)
    pool = KVPool({kind: [0]}, [(1, 4)], 16, "cpu", torch.float32)
    tree, blocks = RadixTree(pool), pool.pools[kind]
    nodes, busy = [], []
    for i in range(2000):
        block = blocks.allocate()
        nodes.append(tree.insert("root", [i] * 16, {kind: [block]}))
        if i < 5:
            busy.append(block)  # a row still holds it: evicting it frees nothing
        else:
            blocks.release(block)
    visits = []
    leaves, is_busy = tree._leaves, tree._busy
    tree._leaves = lambda: (visits.append("leaf") or leaf for leaf in leaves())
    tree._busy = lambda node: visits.append("busy") or is_busy(node)
    assert all(tree.reclaim() for _ in range(100))
    assert [node.alive for node in nodes[:106]] == [True] * 5 + [False] * 100 + [True]  # LRU, busy ones skipped
    budget = tree.bytes() // 2
    tree.fit(budget)
    assert tree.bytes() <= budget and tree.blocks == 950 and all(node.alive for node in nodes[:5] + nodes[-945:])
    assert not nodes[-946].alive
    assert len(visits) <= 100 * 6 + 955  # each reclaim: the 5 busy leaves and the one it takes; fit: one each
    for block in busy:
        blocks.release(block)
    tree.fit(0)
    assert tree.blocks == 0 and blocks.used == 0


def test_a_conversation_survives_another_clients_finish_when_states_fill_the_budget(engine, astronaut_state, tmp_path):
    """States in memory fill --memory-budget (a busy server): the tree still keeps its share, so one client's
    conversation outlives another client's answer (before: the tree's budget was what the states left, none,
    and each finish evicted every other conversation). The states give way to what the tree keeps of its
    share, so both together stay within the budget."""
    from test_server import LiveServer, image_messages

    budget = 6 * astronaut_state.kv_bytes
    live = LiveServer(engine, tmp_path / "states", memory_budget=budget)
    try:
        store, scheduler = live.service.store, live.service.scheduler
        kept = lambda: scheduler.call(lambda: scheduler._radix.bytes()).result(60)
        ask = lambda question: live.client.chat.completions.create(
            model="any", messages=image_messages("astronaut.png", question), max_tokens=N, temperature=0)
        ask("What objects are visible in this image?")
        ((image_key, (first,)),) = store._continuations.items()
        state = store._hot[image_key]
        for i in range(budget // state.kv_bytes):  # other states fill the budget (copies: same bytes)
            store._keep_hot(f"{i:064x}", state)
        assert store.hot_bytes >= budget - kept() - state.kv_bytes  # full, but for what the tree keeps
        ask("What colors dominate the scene?")  # another client's conversation about the same photo
        records = store._continuations[image_key]
        assert len(records) == 2 and first in records and first.alive and all(r.alive for r in records)
        assert 0 < store.hot_bytes and store.hot_bytes + kept() <= budget
    finally:
        live.close()
