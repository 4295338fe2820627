"""Fixed-size K/V blocks with reference counts: one physical copy of a shared prefix (vLLM's block manager).

A `BlockPool` hands out block ids of one attention layer kind (full, one sliding window, one chunk size: layers
of a kind see the same positions, so one block id names the same positions in each of them); the tensors that
hold the blocks live with the layers (decode.rows), which the pool tells when it grows. A `BlockTables` keeps,
per row of a batch, the block id of every `block_size` positions (NULL where the row's layers keep nothing), and
a device table [rows, width] of them that the attention gathers K/V through.

Ownership: a block's reference count is the number of holders (a prefix written into the pool holds its
blocks once, each row holding them once more). A row writes only into blocks it holds alone: `writable` gives
it a fresh zeroed block where it had none (NULL) and copies a shared one (a prefix's partly filled last block)
before the first write (copy-on-write), so no row ever changes another's keys. A block whose count reaches zero
goes back to the free list.

Two ids are reserved: NULL (zeros, read where a row keeps nothing, never written) and SCRATCH (written where
nothing is read: padding columns of a prefill and idle rows of a fixed-shape step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NULL = 0
SCRATCH = 1
RESERVED = 2
BLOCK_SIZE = 16  # tokens a block holds (vLLM's default; other sizes not measured, docs/benchmarks-paged.md)


class PoolFull(RuntimeError):
    """No free block and the pool is at its limit."""


class BlockPool:
    """Block ids of one layer kind: reference counts and a free list; grows by doubling up to `limit` blocks, as
    rows need them (never sized by max_tokens up front). Sizing it once for the rows admitted was measured not
    to lower the peak: the tensors grow one layer at a time, so a copy's excess is one layer's
    (docs/benchmarks-paged.md)."""

    def __init__(self, block_size: int = BLOCK_SIZE, limit: int | None = None):
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.limit = limit  # blocks at most, the reserved ones included (None: no bound)
        self.refs: list[int] = [0] * RESERVED
        self.free: list[int] = []
        self.used = 0  # blocks held by someone (the reserved ones not counted)
        self.peak = 0  # the most blocks held at once
        self.listeners: list[Callable[[int], None]] = []  # called with the new capacity when the pool grows
        self.fits: Callable[[int], bool] = lambda size: True  # whether a capacity fits (decode.kvpool: bytes)
        # Called when no block is free and the pool is at its bound: frees blocks someone keeps only in case
        # they are wanted again (kept conversations, decode.radix); False when it has none left to free.
        self.reclaim: Callable[[], bool] = lambda: False
        # Called when growing would pass the bound: gives back other kinds' unused capacity (decode.kvpool).
        self.make_room: Callable[[], None] = lambda: None
        # The capacity to grow to from `have`: double; a reserved pool (decode.kvpool, CUDA) its bound at once.
        self.target: Callable[[int], int] = lambda have: max(2 * have, RESERVED + 8)

    @property
    def capacity(self) -> int:
        return len(self.refs)

    @property
    def shared(self) -> int:
        """Blocks with more than one holder."""
        return sum(1 for r in self.refs[RESERVED:] if r > 1)

    def allocate(self) -> int:
        """A free block with one reference (the caller's); its contents are whatever was there."""
        while not self.free:
            try:
                self._grow()
            except PoolFull:
                if not self.reclaim():
                    raise
        block = self.free.pop()
        self.refs[block] = 1
        self.used += 1
        self.peak = max(self.peak, self.used)
        return block

    def hold(self, block: int) -> None:
        if block >= RESERVED:
            if self.refs[block] < 1:
                raise ValueError(f"block {block} is free: nothing to share")
            self.refs[block] += 1

    def release(self, block: int) -> None:
        if block >= RESERVED:
            if self.refs[block] < 1:
                raise ValueError(f"block {block} released more often than held")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free.append(block)
                self.used -= 1

    def make_free(self, blocks: int) -> None:
        """Grow at once (one copy of the tensors) so that `blocks` blocks are free, as far as the bound allows;
        allocate() still raises PoolFull when they do not fit."""
        if len(self.free) < blocks:
            try:
                self._grow(self.capacity + blocks - len(self.free))
            except PoolFull:
                pass

    def _grow(self, at_least: int = 0) -> None:
        have = self.capacity
        size = max(self.target(have), at_least)
        if self.limit is not None:
            size = min(size, self.limit)
        if size > have and not self.fits(size):
            self.make_room()
        if size > have and not self.fits(size):
            low, high = have, size  # the largest capacity that fits: low fits (or is what we have), high not
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if self.fits(middle) else (low, middle)
            size = low
        if size <= have:
            raise PoolFull(f"all {have - RESERVED} K/V blocks are in use")
        for listener in self.listeners:  # first: a failed allocation must not leave ids beyond the tensors
            listener(size)
        self.refs.extend([0] * (size - have))
        self.free[:0] = range(size - 1, have - 1, -1)  # lowest ids first out, ids freed before them first: a compact pool

    def shrink(self) -> int:
        """Drop the free ids above the highest block in use (the tensors are cut by the listener's owner);
        returns the new capacity."""
        top = next((b + 1 for b in range(self.capacity - 1, RESERVED - 1, -1) if self.refs[b]), RESERVED)
        if top < self.capacity:
            del self.refs[top:]
            self.free = [b for b in self.free if b < top]
        return top


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockTables:
    """Per row: its blocks of one layer kind, and the device table [rows, width] the attention reads through.

    `zero(block)` and `copy(source, target)` act on every layer's tensors of the kind (decode.rows sets them).
    Rows are numbered like the batch's slots: a row that leaves is replaced by the last one."""

    def __init__(self, pool: BlockPool, device=None):
        self.pool = pool
        self.device = device
        self.rows: list[list[int]] = []
        self.table = torch.full((0, 0), NULL, dtype=torch.long, device=device)
        self.zero: Callable[[int], None] = lambda block: None
        self.copy: Callable[[int, int], None] = lambda source, target: None
        self.copy_on_write = True  # off only in the control test that shows why it is on

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def reserve(self, rows: int, width: int) -> None:
        """A device table of at least `rows` rows and `width` blocks."""
        have_rows, have_width = self.table.shape
        if rows <= have_rows and width <= have_width:
            return
        grown = self.table.new_full((max(rows, have_rows), max(width, have_width)), NULL)
        grown[:have_rows, :have_width] = self.table
        self.table = grown

    def add_row(self, blocks: list[int]) -> int:
        """A new last row with `blocks` (one reference to each already taken for it); returns its index."""
        slot = len(self.rows)
        self.reserve(slot + 1, len(blocks))
        self.rows.append(list(blocks))
        self.table[slot] = NULL
        if blocks:
            self.table[slot, : len(blocks)] = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return slot

    def share_row(self, blocks: list[int]) -> int:
        """A new last row referencing `blocks` (a prefix's): each is held once more."""
        for block in blocks:
            self.pool.hold(block)
        return self.add_row(blocks)

    def remove_row(self, slot: int) -> None:
        """Release a row's blocks; the last row moves into its index."""
        for block in self.rows[slot]:
            self.pool.release(block)
        last = len(self.rows) - 1
        if slot != last:
            self.rows[slot] = self.rows[last]
            self.table[slot] = self.table[last]
        self.rows.pop()
        self.table[last] = NULL

    def writable(self, slot: int, start: int, end: int) -> None:
        """Make positions start..end of a row writable: blocks of its own for them, a shared one copied first."""
        if end <= start:
            return
        size = self.block_size
        row = self.rows[slot]
        last = blocks_for(end, size)
        self.reserve(slot + 1, last)
        while len(row) < last:
            row.append(NULL)
        for j in range(start // size, last):
            block = row[j]
            if block == NULL:
                fresh = self.pool.allocate()
                self.zero(fresh)  # a reused block holds another row's keys (maybe NaN): masked, but 0 * NaN is NaN
            elif self.pool.refs[block] > 1 and self.copy_on_write:
                fresh = self.pool.allocate()
                self.copy(block, fresh)
                self.pool.release(block)
            else:
                continue
            row[j] = fresh
            self.table[slot, j] = fresh

    def stats(self) -> dict:
        return {"block_size": self.block_size, "used": self.pool.used, "shared": self.pool.shared,
                "free": self.pool.capacity - RESERVED - self.pool.used}
