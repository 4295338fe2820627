"""Kept conversations as chains of K/V blocks in one prefix tree keyed by token ids (SGLang's RadixAttention).

A finished row's blocks (decode.blocks, in a KVPool) are inserted under a root, the key of the state it
continued (the image state's key: model, media, template, cache_salt), one tree node per block of block_size
token ids, so conversations that share their first tokens share the nodes and blocks of them: one physical copy.
A later row about the same root (a follow-up, a regenerate, another client's question with the same
conversation) matches the longest run of its leading ids and references those blocks instead of holding a
copy; the block it goes on writing into is copied first (copy-on-write: the tree holds a reference, so its
count is above one), so nothing in the tree ever changes.

Ownership: each node holds one reference to each of its blocks (per layer kind; NULL where a sliding or chunked
layer keeps nothing: those positions are outside every later query's window, since a match is used only from the
root's state on). Rows hold their own references. Eviction removes least recently used leaves and releases
the tree's references; a block a running row uses is never freed by it (its count stays above zero until the
row leaves), and `reclaim` (more blocks wanted than the pool's bound allows) skips such leaves, since dropping
them frees nothing.

Isolation is the caller's: a root's conversations are found only by requests that the caller (the server's
state lookup, with its salt and sharing rules) has already allowed to read that root's state.

Lookups (`match`) may come from other threads than the one that owns the pool; they take the tree's lock and
read only ids and node liveness. Inserting and evicting (which change reference counts) belong to the thread
that owns the pool (the server's model thread).
"""

from __future__ import annotations

import heapq
import itertools
import threading

from .blocks import NULL
from .kvpool import KVPool


class Node:
    """One block of a kept conversation: `ids` (block_size token ids, fewer for a conversation's last, partly
    filled block), its block per layer kind, and where it sits in the tree."""

    __slots__ = ("alive", "blocks", "children", "ids", "parent", "used")

    def __init__(self, ids: tuple, blocks: dict, parent: Node | None):
        self.ids, self.blocks, self.parent = ids, blocks, parent
        self.children: dict[tuple, Node] = {}
        self.used = 0  # the tree's clock when last matched or inserted (LRU)
        self.alive = True  # False once evicted: a kept conversation ending here can no longer be continued


class RadixTree:
    def __init__(self, pool: KVPool):
        self.pool = pool
        self.block_size = pool.block_size
        self.roots: dict[str, Node] = {}
        self.blocks = 0  # nodes in the tree (each holds one block per layer kind)
        self.kept = {kind: 0 for kind in pool.kind_layers}  # per layer kind: blocks the nodes hold (NULLs not counted)
        self._clock = itertools.count(1)
        self._lock = threading.RLock()

    # -- lookups -----------------------------------------------------------------------------------------------

    def match(self, root: str, ids: list[int]) -> tuple[int, dict, Node | None]:
        """The longest run of `ids` the tree holds under `root`: (its length in tokens, per layer kind the
        block ids that cover it, the last node reached). Touches the nodes on the way (LRU)."""
        size = self.block_size
        with self._lock:
            node = self.roots.get(root)
            chains: dict = {kind: [] for kind in self.pool.kind_layers}
            matched, last = 0, None
            now = next(self._clock)
            while node is not None and matched < len(ids):
                piece = tuple(ids[matched : matched + size])
                child = node.children.get(piece) if len(piece) == size else None
                if child is None:  # the longest partial agreement within one block ends the match
                    best, best_len = None, 0
                    for key, candidate in node.children.items():
                        same = _common(key, piece)
                        if same > best_len:
                            best, best_len = candidate, same
                    if best is None:
                        break
                    child, step = best, best_len
                else:
                    step = size
                child.used = now
                for kind, block in child.blocks.items():
                    chains[kind].append(block)
                matched += step
                last = child
                if step < size:
                    break
                node = child
            return matched, chains, last

    # -- holders (the pool's thread) ---------------------------------------------------------------------------

    def insert(self, root: str, ids: list[int], chains: dict) -> Node | None:
        """Keep the conversation `ids` (its blocks per layer kind: `chains[kind][j]` holds positions
        j*block_size..) under `root`; blocks the tree already holds for the same ids are kept as they are.
        Returns the node of its last block (None for no ids)."""
        size = self.block_size
        with self._lock:
            node = self.roots.get(root)
            if node is None:
                node = self.roots[root] = Node((), {}, None)
            now = next(self._clock)
            for j in range(-(-len(ids) // size)):
                piece = tuple(ids[j * size : (j + 1) * size])
                child = node.children.get(piece)
                if child is None:
                    blocks = {kind: chain[j] for kind, chain in chains.items()}
                    for kind, block in blocks.items():
                        self.pool.pools[kind].hold(block)
                        self.kept[kind] += block != NULL
                    child = node.children[piece] = Node(piece, blocks, node)
                    self.blocks += 1
                child.used = now
                node = child
            return node if ids else None

    def evict(self, leaves: int | None = None, busy_too: bool = True) -> int:
        """Remove up to `leaves` least recently used leaves (all the tree's nodes by default), a parent becoming
        a leaf in turn; `busy_too` False: skip a leaf whose blocks a row also holds (removing it frees nothing).
        Returns the blocks the pool got back (for every kind together)."""
        freed = 0
        with self._lock:
            heap = [(leaf.used, id(leaf), leaf) for leaf in self._leaves()]
            heapq.heapify(heap)
            removed = 0
            while heap and (leaves is None or removed < leaves):
                _, _, leaf = heapq.heappop(heap)
                if not busy_too and self._busy(leaf):
                    continue
                freed += self._remove(leaf)
                removed += 1
                parent = leaf.parent
                if parent is not None and parent.parent is not None and not parent.children:
                    heapq.heappush(heap, (parent.used, id(parent), parent))
        return freed

    def bytes(self) -> int:
        """Bytes of the blocks the tree holds (every kind)."""
        return sum(count * self.pool.block_bytes(kind) for kind, count in self.kept.items())

    def fit(self, budget: int) -> None:
        """Evict least recently used leaves no row uses until the tree's blocks take at most `budget` bytes."""
        while self.bytes() > budget and self.evict(1, busy_too=False) > 0:
            pass

    def reclaim(self) -> bool:
        """Free one least recently used leaf that no row uses (the pool wants a block beyond its bound)."""
        return self.evict(1, busy_too=False) > 0

    def drop(self, root: str) -> None:
        """Forget every conversation under `root` (its state was deleted); rows using them keep their blocks."""
        with self._lock:
            top = self.roots.pop(root, None)
            stack = list(top.children.values()) if top is not None else []
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                node.children = {}
                self._release(node)

    def clear(self) -> None:
        for root in list(self.roots):
            self.drop(root)

    def abandon(self) -> None:
        """Forget everything without touching the pool (it is being dropped: a failed forward's)."""
        with self._lock:
            stack = list(self.roots.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                node.alive = False
            self.roots = {}

    def held(self) -> dict:
        """Per layer kind: how many references the tree holds on each block (for checks)."""
        out: dict = {kind: {} for kind in self.pool.kind_layers}
        with self._lock:
            stack = list(self.roots.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                for kind, block in node.blocks.items():
                    if block != NULL:
                        out[kind][block] = out[kind].get(block, 0) + 1
        return out

    # -- internals ---------------------------------------------------------------------------------------------

    def _leaves(self):
        stack = list(self.roots.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.parent is not None:
                yield node

    def _busy(self, node: Node) -> bool:
        return any(block != NULL and self.pool.pools[kind].refs[block] > 1 for kind, block in node.blocks.items())

    def _remove(self, leaf: Node) -> int:
        parent = leaf.parent
        del parent.children[leaf.ids]
        if parent.parent is None and not parent.children:
            self.roots = {k: v for k, v in self.roots.items() if v is not parent}
        return self._release(leaf)

    def _release(self, node: Node) -> int:
        freed = 0
        for kind, block in node.blocks.items():
            pool = self.pool.pools[kind]
            if block != NULL:
                freed += pool.refs[block] == 1
                self.kept[kind] -= 1
            pool.release(block)
        node.alive = False
        self.blocks -= 1
        return freed


def _common(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
