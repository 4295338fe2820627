"""The K/V block pool on its own: reference counts, the free list, copy-on-write (no model needed)."""

import random

import pytest
import torch

from vlcache.decode.blocks import NULL, RESERVED, BlockPool, BlockTables, PoolFull


class Store:
    """A pool's tensor: one value per position, grown and written the way decode.rows grows its layers."""

    def __init__(self, pool: BlockPool, tables: BlockTables):
        self.data = torch.zeros(pool.capacity, pool.block_size)
        pool.listeners.append(self.grow)
        tables.zero = lambda block: self.data[block].zero_()
        tables.copy = lambda source, target: self.data[target].copy_(self.data[source])

    def grow(self, size):
        grown = torch.zeros(size, self.data.shape[1])
        grown[: self.data.shape[0]] = self.data
        self.data = grown

    def read(self, blocks, start, end, size):
        return [float(self.data[blocks[p // size], p % size]) for p in range(start, end)]

    def write(self, blocks, start, values, size):
        for p, value in enumerate(values, start):
            self.data[blocks[p // size], p % size] = value


def prefix_blocks(pool, store, tokens, value):
    """A prefix of `tokens` positions written once (value at each position), its blocks held by the prefix."""
    size = pool.block_size
    blocks = [pool.allocate() for _ in range(-(-tokens // size))]
    for block in blocks:
        store.data[block].zero_()
    store.write(blocks, 0, [value] * tokens, size)
    return blocks


def test_refcounts_return_to_zero_after_1000_random_joins_and_leaves():
    rng = random.Random(28)
    pool = BlockPool(block_size=4)
    tables = BlockTables(pool)
    store = Store(pool, tables)
    prefixes = {}  # value -> (tokens, blocks, users)
    rows = []  # per row: (prefix value, length, its own values)
    for step in range(1000):
        if rows and (rng.random() < 0.45 or len(rows) > 24):
            slot = rng.randrange(len(rows))
            value, _, _ = rows[slot]
            tables.remove_row(slot)
            rows[slot] = rows[-1]
            rows.pop()
            tokens, blocks, users = prefixes[value]
            if users == 1:
                for block in blocks:
                    pool.release(block)
                del prefixes[value]
            else:
                prefixes[value] = (tokens, blocks, users - 1)
        else:
            value = rng.randrange(1, 6)
            if value not in prefixes:
                tokens = rng.randrange(0, 23)
                prefixes[value] = (tokens, prefix_blocks(pool, store, tokens, value), 0)
            tokens, blocks, users = prefixes[value]
            prefixes[value] = (tokens, blocks, users + 1)
            tables.share_row(blocks)
            rows.append((value, tokens, []))
        # Some rows write their next tokens (a row's own values: 100 * step + position).
        for slot in rng.sample(range(len(rows)), min(3, len(rows))):
            value, length, own = rows[slot]
            n = rng.randrange(1, 7)
            tables.writable(slot, length, length + n)
            blocks = tables.rows[slot]
            assert all(pool.refs[blocks[p // 4]] == 1 for p in range(length, length + n))  # written alone
            new = [100.0 * step + i for i in range(n)]
            store.write(blocks, length, new, 4)
            rows[slot] = (value, length + n, own + new)
        # Every row reads its prefix and exactly its own tokens, through its table row too.
        for slot, (value, length, own) in enumerate(rows):
            tokens = prefixes[value][0]
            blocks = tables.rows[slot]
            assert store.read(blocks, 0, length, 4) == [float(value)] * tokens + own
            assert tables.table[slot, : len(blocks)].tolist() == blocks
        assert tables.table[len(rows):].eq(NULL).all()
        held = sum(len([b for b in r if b != NULL]) for r in tables.rows) + sum(len(p[1]) for p in prefixes.values())
        assert sum(pool.refs) == held and pool.used == sum(1 for r in pool.refs if r > 0) <= pool.peak
    for slot in reversed(range(len(rows))):
        tables.remove_row(slot)
    for _, blocks, _ in prefixes.values():
        for block in blocks:
            pool.release(block)
    assert pool.used == 0 and set(pool.refs) == {0}
    assert sorted(pool.free) == list(range(RESERVED, pool.capacity))
    assert pool.capacity > RESERVED + 8  # it grew on the way


def test_a_shared_partial_block_is_copied_before_the_first_write():
    pool = BlockPool(block_size=4)
    tables = BlockTables(pool)
    store = Store(pool, tables)
    prefix = prefix_blocks(pool, store, 6, 7.0)  # blocks: 4 positions, then 2 of 4
    a, b = tables.share_row(prefix), tables.share_row(prefix)
    assert [pool.refs[x] for x in prefix] == [3, 3]
    tables.writable(a, 6, 7)
    store.write(tables.rows[a], 6, [1.0], 4)
    tables.writable(b, 6, 7)
    store.write(tables.rows[b], 6, [2.0], 4)
    assert tables.rows[a][0] == tables.rows[b][0] == prefix[0]  # the full block stays shared
    assert len({tables.rows[a][1], tables.rows[b][1], prefix[1]}) == 3  # the partial one: a copy each
    assert store.read(tables.rows[a], 0, 7, 4) == [7.0] * 6 + [1.0]
    assert store.read(tables.rows[b], 0, 7, 4) == [7.0] * 6 + [2.0]
    assert store.read(prefix, 0, 6, 4) == [7.0] * 6  # the prefix itself never written
    assert [pool.refs[x] for x in prefix] == [3, 1]
    assert pool.shared == 1 and pool.used == 4


def test_control_without_copy_on_write_a_row_changes_its_neighbours_keys():
    pool = BlockPool(block_size=4)
    tables = BlockTables(pool)
    store = Store(pool, tables)
    tables.copy_on_write = False
    prefix = prefix_blocks(pool, store, 6, 7.0)
    a, b = tables.share_row(prefix), tables.share_row(prefix)
    tables.writable(a, 6, 7)
    store.write(tables.rows[a], 6, [1.0], 4)
    tables.writable(b, 6, 7)
    store.write(tables.rows[b], 6, [2.0], 4)
    assert store.read(tables.rows[a], 0, 7, 4) == [7.0] * 6 + [2.0]  # b overwrote a's token


def test_a_row_on_a_block_boundary_state_allocates_only_its_own_blocks():
    pool = BlockPool(block_size=4)
    tables = BlockTables(pool)
    store = Store(pool, tables)
    prefix = prefix_blocks(pool, store, 8, 7.0)
    for _ in range(16):
        slot = tables.share_row(prefix)
        tables.writable(slot, 8, 8 + 5)  # 5 tokens of its own: 2 blocks
    assert pool.used == 2 + 16 * 2 and pool.shared == 2


def test_free_blocks_are_reused_and_a_limit_refuses():
    pool = BlockPool(block_size=4, limit=RESERVED + 3)
    got = [pool.allocate() for _ in range(3)]
    with pytest.raises(PoolFull):
        pool.allocate()
    pool.release(got[1])
    assert pool.allocate() == got[1]
    pool.release(got[0])
    with pytest.raises(ValueError):
        pool.release(got[0])  # released more often than held
    with pytest.raises(ValueError):
        pool.hold(got[0])  # free now: cannot be shared


def test_null_blocks_are_never_written_and_fresh_blocks_are_zeroed():
    pool = BlockPool(block_size=4)
    tables = BlockTables(pool)
    store = Store(pool, tables)
    slot = tables.share_row([NULL, NULL])  # a sliding layer's positions it keeps nothing of
    block = pool.allocate()
    store.data[block] = float("nan")
    pool.release(block)  # back on the free list, stale
    tables.writable(slot, 5, 6)
    assert tables.rows[slot][0] == NULL and tables.rows[slot][1] == block
    assert torch.equal(store.data[block], torch.zeros(4)) and store.data[NULL].eq(0).all()


def _written(pool, i, chain, start, end):
    """Layer i's K at positions start..end of `chain`, read back one position at a time."""
    size = pool.block_size
    return torch.stack([pool.keys[i][chain[p // size], :, p % size] for p in range(start, end)], dim=1)


@pytest.mark.parametrize("tokens,stored,scatter", [(37, 37, False), (37, 37, True), (37, 10, False), (32, 32, False),
                                                   (5, 5, False), (40, 3, True)])
def test_a_prefix_is_written_whole_blocks_at_once_and_reads_back_exactly(tokens, stored, scatter):
    """KVPool writes a state's whole blocks in one copy (a slice for consecutive ids, an index otherwise) and its
    partly covered ends per position: every position reads back what the state holds, the rest of a partly written
    block is zeros (a stale NaN there would poison the masked matmul), and blocks before a sliding layer's window
    stay NULL."""
    from vlcache.decode.kvpool import KVPool
    from vlcache.decode.rows import Prefix

    kind = (None, None)
    pool = KVPool({kind: [0, 1]}, [(2, 3), (2, 3)], block_size=8, device="cpu", dtype=torch.float32)
    blocks = pool.pools[kind]
    if scatter:  # stale NaN blocks handed out in a scrambled order: ids that do not run consecutively
        taken = [blocks.allocate() for _ in range(12)]
        pool.ensure()
        for block in taken:
            pool.keys[0][block] = pool.keys[1][block] = float("nan")
        for block in taken[::2] + taken[1::2]:
            blocks.release(block)
    kv = [(torch.randn(1, 2, stored, 3), torch.randn(1, 2, stored, 3)) for _ in range(2)]
    prefix = Prefix(kv, tokens)
    chain = pool.hold(prefix).blocks[kind]
    first = tokens - stored
    assert all(b == NULL for b in chain[: first // 8]) and NULL not in chain[first // 8 :]
    if scatter and len(chain) - first // 8 > 1:
        ids = chain[first // 8 :]
        assert ids != list(range(ids[0], ids[0] + len(ids)))  # the index path really ran
    for i in range(2):
        assert torch.equal(_written(pool, i, chain, first, tokens), kv[i][0][0])
        assert torch.equal(torch.stack([pool.values[i][chain[p // 8], :, p % 8] for p in range(first, tokens)], 1), kv[i][1][0])
    edge = [(first // 8 * 8, first), (tokens, -(-tokens // 8) * 8)]
    for lo, hi in edge:
        if lo < hi:
            assert _written(pool, 0, chain, lo, hi).eq(0).all()


def test_two_kinds_fill_their_bound_exactly_after_a_state_left():
    """A bound of 16 blocks, two layer kinds of equal block bytes (NULL and SCRATCH are 2 of each kind's). A state
    of 5 + 1 blocks is written and released; then one of 7 + 5 blocks, which with the reserved ids takes the bound
    exactly, must fit (the server admitted it by these bytes). The prefix headroom grew the first kind into the
    room the second needed and its blocks went to the new top ids ahead of the ones freed below them, so the first
    kind could not be trimmed and the second got PoolFull with the bound not passed."""
    from vlcache.decode.kvpool import KVPool
    from vlcache.decode.rows import Prefix

    full, window = (None, None), (8, None)
    pool = KVPool({full: [0], window: [1]}, [(1, 2), (1, 2)], block_size=4, device="cpu", dtype=torch.float32)
    pool.limit_bytes = 16 * pool.block_bytes(full)

    def state(tokens, windowed):
        return Prefix([(torch.randn(1, 1, tokens, 2),) * 2, (torch.randn(1, 1, windowed, 2),) * 2], tokens)

    first = state(19, 2)
    assert pool.prefix_blocks(first) == {full: 5, window: 1}
    pool.hold(first)
    pool.release(first)
    second = state(25, 14)
    assert pool.prefix_blocks(second) == {full: 7, window: 5}
    held = pool.hold(second)
    assert [len([b for b in held.blocks[k] if b != NULL]) for k in (full, window)] == [7, 5]
    assert sum(p.capacity for p in pool.pools.values()) <= 16 and pool.bytes_used() == 12 * pool.block_bytes(full)
