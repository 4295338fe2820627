"""The K/V blocks of a model's attention layers, which any number of batches read (issue 28).

A `KVPool` holds, per attention layer, the tensors [blocks, kv_heads, block_size, D] of its K and V, and per
layer kind (full, one sliding window, one chunk size) a `BlockPool` of block ids (decode.blocks): the layers
of a kind keep the same positions of a row, so one block id names them in each. A prefix (an image state's
K/V) is written into blocks once, by the first row that uses it, and released when its last row leaves,
whichever batch the rows are in: the server prefills joining rows in a batch of their own and moves them into
the running one without copying the state again.

`limit_bytes` bounds the blocks (all kinds together); a block that would pass it raises PoolFull (the
server's admission keeps that from happening: it reserves a request's blocks before it starts).

On the CPU the tensors grow by doubling (the old ones copied, then freed). Reserving the whole budget at once
on the CPU, with pages committed only when written, was tried and dropped: Linux's heuristic overcommit charges a
fork for all of a process's private writable memory, so a process holding a few such pools could no longer start
a subprocess (Ray failed with ENOMEM). On CUDA the server's pool is reserved (`reserve=True`, chosen in
`serving_pool`): made at its bound with its first block and never grown, as vLLM reserves its K/V at start,
because the pool's block count is a dimension of the compiled step and on CUDA each new one is a CUDA graph
recorded when a request makes the pool grow. A reserved pool gives every layer kind the same number of blocks:
the bound over one block of each kind, as admission counts a row's blocks in every kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .blocks import NULL, RESERVED, BlockPool, PoolFull, blocks_for


@dataclass(eq=False)
class Held:
    """A prefix written into the pool: its blocks per layer kind (one reference each) and its rows."""

    blocks: dict
    users: int = 0


# Blocks a pool grows by beyond a prefix it writes: room for a row's first question without a second growth
# (each growth copies every layer's tensors; a fresh pool per Engine.ask paid three of them before its first token).
PREFIX_HEADROOM = 4


def default_kv_memory(device) -> int:
    """`vlcache serve`'s bound on K/V blocks when --kv-memory is not given: half the memory free on the device
    at start (CUDA: free GPU memory once the model is loaded; CPU: the system's MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2


def kind_name(kind: tuple) -> str:
    window, chunk = kind
    return f"chunk {chunk}" if chunk else f"window {window}" if window else "full"


def serving_pool(layout: KVPool, limit_bytes: int | None) -> KVPool:
    """The server's pool (one per scheduler), of `layout`'s layer kinds and shapes, bounded to `limit_bytes`
    (--kv-memory): reserved at that bound on CUDA (see above), grown by doubling elsewhere or when unbounded."""
    return KVPool(layout.kind_layers, layout.shapes, layout.block_size, layout.device, layout.dtype, limit_bytes,
                  reserve=reserves(layout.device, limit_bytes))


def reserves(device, limit_bytes: int | None) -> bool:
    """Whether the server's pool is reserved at its bound: on CUDA, when it has one."""
    return torch.device(device).type == "cuda" and limit_bytes is not None


class KVPool:
    def __init__(self, kind_layers: dict[tuple, list[int]], shapes: list, block_size: int, device,
                 dtype: torch.dtype | None = None, limit_bytes: int | None = None, reserve: bool = False):
        self.kind_layers = kind_layers  # (window, chunk) -> the attention layers of that kind
        self.shapes = shapes  # per layer: (kv_heads, head_dim)
        self.block_size = block_size
        self.device = device
        self.dtype = dtype  # the blocks' dtype: the model's, or the first state's
        self.limit_bytes = limit_bytes
        # Tensors made at the bound (limit_bytes, then required) with the first block, never grown nor trimmed.
        self.reserve = reserve
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.pools: dict[tuple, BlockPool] = {}
        for kind in kind_layers:
            pool = self.pools[kind] = BlockPool(block_size)
            pool.listeners.append(lambda size, kind=kind: self._grow(kind, size))
            pool.fits = lambda size, kind=kind: self._fits(kind, size)
            pool.make_room = lambda kind=kind: self._trim_others(kind)
            if reserve:
                pool.target = lambda have: max(have, self.reserved_blocks())
                # Never past its share, even where the bound's remainder would fit a block more: make_free's
                # `at_least` would otherwise grow (copy) a reserved kind and leave another kind short of its own.
                pool.fits = lambda size, kind=kind: size <= self.reserved_blocks() and self._fits(kind, size)
                pool.make_room = lambda: None
        self.held: dict = {}  # Prefix -> Held: prefixes written into the blocks, while rows use them

    # -- sizes -------------------------------------------------------------------------------------------------

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype or torch.float32).element_size()

    def block_bytes(self, kind: tuple) -> int:
        """Bytes of one block of a kind: K and V of every layer of the kind."""
        size = self.element_size()
        return sum(2 * self.shapes[i][0] * self.block_size * self.shapes[i][1] * size for i in self.kind_layers[kind])

    def bytes_used(self) -> int:
        """Bytes of the blocks in use (all kinds)."""
        return sum(pool.used * self.block_bytes(kind) for kind, pool in self.pools.items())

    def reserved_blocks(self) -> int:
        """Blocks per kind of a reserved pool (the reserved ids included): the bound over one block of each kind."""
        if self.limit_bytes is None:
            raise ValueError("a reserved K/V pool needs limit_bytes")
        return self.limit_bytes // sum(self.block_bytes(kind) for kind in self.kind_layers)

    def _fits(self, kind: tuple, size: int) -> bool:
        if self.limit_bytes is None:
            return True
        others = sum(pool.capacity * self.block_bytes(k) for k, pool in self.pools.items() if k != kind)
        return others + size * self.block_bytes(kind) <= self.limit_bytes

    def _trim_others(self, kind: tuple) -> None:
        """Give back the unused capacity at the top of the other kinds' tensors, so that a kind can grow within
        the bound when the others grew earlier and have emptied since (each kind's capacity would only grow,
        and a model with two kinds could then fail for want of blocks with the bound not reached)."""
        for other, pool in self.pools.items():
            if other == kind or pool.capacity <= RESERVED:
                continue
            top = pool.shrink()
            for i in self.kind_layers[other]:
                for tensors in (self.keys, self.values):
                    if i in tensors and tensors[i].shape[0] > top:
                        tensors[i] = tensors[i][:top].clone()

    def stats(self) -> dict:
        """Per layer kind ("full", "window 512", "chunk 8192"): block size, blocks used, shared, free (in the
        tensors), the most used at once, the bytes of one block."""
        return {kind_name(kind): {"block_size": self.block_size, "used": pool.used, "shared": pool.shared,
                                  "free": pool.capacity - RESERVED - pool.used, "peak": pool.peak,
                                  "block_bytes": self.block_bytes(kind)}
                for kind, pool in self.pools.items()}

    def set_reclaim(self, reclaim) -> None:
        """`reclaim()` frees a block kept only in case it is wanted again (decode.radix) when a kind's pool is at
        the bound; False when nothing is left to free."""
        for pool in self.pools.values():
            pool.reclaim = reclaim

    # -- tensors -----------------------------------------------------------------------------------------------

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        if self.dtype is None and not self.keys:
            self.dtype = dtype

    def _grow(self, kind: tuple, blocks: int) -> None:
        """Room for `blocks` blocks in each layer of the kind. The reserved blocks (NULL, SCRATCH) are zeros:
        masked positions still go through the matmuls, and 0 * NaN is NaN; any other block is written before
        it is read."""
        for i in self.kind_layers[kind]:
            heads, dim = self.shapes[i]
            for tensors in (self.keys, self.values):
                old = tensors.get(i)
                if old is not None and blocks <= old.shape[0]:
                    continue
                buffer = torch.empty((blocks, heads, self.block_size, dim), dtype=self.dtype, device=self.device)
                if old is not None:
                    buffer[: old.shape[0]] = old
                else:
                    buffer[:RESERVED] = 0
                tensors[i] = buffer

    def ensure(self) -> None:
        """Every layer's tensors exist (as large as its kind's pool; a reserved pool's at its bound)."""
        for kind, pool in self.pools.items():
            if self.reserve and pool.capacity < self.reserved_blocks():
                pool._grow()  # (its listener, _grow here, makes the tensors)
            self._grow(kind, pool.capacity)

    def zero(self, kind: tuple, block: int) -> None:
        for i in self.kind_layers[kind]:
            self.keys[i][block] = 0
            self.values[i][block] = 0

    def copy(self, kind: tuple, source: int, target: int) -> None:
        for i in self.kind_layers[kind]:
            self.keys[i][target] = self.keys[i][source]
            self.values[i][target] = self.values[i][source]

    def put(self, i: int, chain: list[int], start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write [kv_heads, n, D] K/V of layer i at positions start.. of the blocks `chain` (by position). The
        whole blocks go in one copy (a slice where their ids run consecutively, as a fresh pool hands them out:
        7x cheaper than an index per position), the partly covered ends per position."""
        n = keys.shape[-2]
        if not n:
            return
        size, end = self.block_size, start + n
        first, last = -(-start // size), end // size  # the whole blocks: first..last-1
        if first >= last:
            first = last = end  # no whole block: every position goes the per-position way
        else:
            heads, dim = keys.shape[0], keys.shape[-1]
            a, b = first * size - start, last * size - start
            ids = chain[first:last]
            run = ids[-1] - ids[0] == len(ids) - 1 and ids == list(range(ids[0], ids[-1] + 1))
            target = slice(ids[0], ids[-1] + 1) if run else torch.tensor(ids, device=self.device)
            for pool, part in ((self.keys[i], keys), (self.values[i], values)):
                pool[target] = part[:, a:b].reshape(heads, last - first, size, dim).transpose(0, 1)
        table = None
        for lo, hi in ((start, min(end, first * size)), (max(start, last * size), end)):
            if lo < hi:
                table = table if table is not None else torch.tensor(chain, dtype=torch.long, device=self.device)
                block, offset = self.where(table, lo, hi)
                self.keys[i][block, :, offset] = keys[:, lo - start : hi - start].transpose(0, 1)
                self.values[i][block, :, offset] = values[:, lo - start : hi - start].transpose(0, 1)

    def where(self, blocks: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = torch.arange(start, end, device=blocks.device)
        return blocks[position // self.block_size], position % self.block_size

    # -- prefixes ----------------------------------------------------------------------------------------------

    def hold(self, prefix) -> Held:
        """The prefix's blocks per kind (written into the pool by its first row), held by one more row."""
        held = self.held.get(prefix)
        if held is None and prefix.blocks is not None:  # blocks already in this pool (a kept conversation's)
            for kind, chain in prefix.blocks.items():
                for block in chain:
                    self.pools[kind].hold(block)
            held = self.held[prefix] = Held({kind: list(chain) for kind, chain in prefix.blocks.items()})
        if held is None:
            blocks = {}
            try:
                for kind in self.kind_layers:
                    blocks[kind] = self._write_prefix(kind, prefix)
            except PoolFull:
                for kind, written in blocks.items():
                    for block in written:
                        self.pools[kind].release(block)
                raise
            held = self.held[prefix] = Held(blocks)
        held.users += 1
        return held

    def release(self, prefix) -> None:
        held = self.held[prefix]
        held.users -= 1
        if held.users == 0:
            for kind, blocks in held.blocks.items():
                for block in blocks:
                    self.pools[kind].release(block)
            del self.held[prefix]

    def prefix_blocks(self, prefix) -> dict[tuple, int]:
        """Blocks per kind that writing `prefix` would take (none if it is held already)."""
        if prefix in self.held or prefix.blocks is not None:
            return {kind: 0 for kind in self.kind_layers}
        return {kind: len(self._prefix_range(kind, prefix)) for kind in self.kind_layers}

    def _prefix_range(self, kind: tuple, prefix) -> range:
        stored = max(prefix.kv[i][0].shape[-2] for i in self.kind_layers[kind])
        return range((prefix.tokens - stored) // self.block_size, blocks_for(prefix.tokens, self.block_size))

    def _write_prefix(self, kind: tuple, prefix) -> list[int]:
        """Blocks holding the prefix's K/V of one kind's layers; NULL for positions none of them keeps (a sliding
        layer's before its window, a chunked layer's before its last chunk)."""
        pool, tokens, size = self.pools[kind], prefix.tokens, self.block_size
        blocks = [NULL] * blocks_for(tokens, size)
        written = self._prefix_range(kind, prefix)
        pool.make_free(len(written) + PREFIX_HEADROOM)
        first = tokens - min(prefix.kv[i][0].shape[-2] for i in self.kind_layers[kind])  # written by every layer from here
        try:
            for j in written:
                blocks[j] = pool.allocate()
                if j * size < first or (j + 1) * size > tokens:  # partly written: the rest must be zeros
                    self.zero(kind, blocks[j])
        except PoolFull:
            for block in blocks:
                pool.release(block)
            raise
        for i in self.kind_layers[kind]:
            keys, values = prefix.kv[i]
            self.put(i, blocks, tokens - keys.shape[-2], keys[0], values[0])
        return blocks
