"""A batch of independent rows: each row continues from its own prefix, reading K/V through a block table.

Rows join and leave between forwards. Every attention layer keeps its K/V in fixed-size blocks [blocks,
kv_heads, block_size, D] (decode.blocks); a row's block table names, for every block_size positions, the block
that holds them. A prefix (an image state's K/V) is written into blocks once, by the first row that uses it;
every further row on the same Prefix object references those blocks (reference counts) and owns only the blocks
of its own tokens (question and answer so far). Its own tokens begin on a fresh block after the prefix's last
one (`fresh_rows`): the unused tail of a partly filled last block stays a hole, empty in `RowsBook.keys`, so
the masks skip it and logical positions (RoPE) are unchanged; a row's physical end (`ends`) is then apart from
its logical length, and whatever reads a row's positions maps them past the hole. Where rows stay contiguous
(the server's: their blocks become chains of token ids), the prefix's partly filled last block is copied when
a row first writes into it (copy-on-write). Either way no row ever changes another's keys. A layer's attention gathers a few
rows' blocks at a time into [rows, kv_heads, span, D] in position order (a chunk's K/V and scores within
GATHER_BUDGET bytes, never every row's at once), so each chunk's attention is the one of a contiguous layout;
the chunks' sizes depend only on the rows and the span (a multiple of the block size), which a compiled step
can fix. A row that leaves releases its blocks and is replaced by the
last one (its block table moves, no K/V is copied), so the running rows are always the first B.

Which keys a query sees is decided from logical positions (a row's unpadded sequence index), kept per slot
in `RowsBook.keys` (-1: empty): padding, causality and sliding windows give each row exactly what it would
compute alone. A sliding-window layer's state holds only the last window - 1 prefix tokens; they are written
to the blocks of their positions and the blocks before them are NULL (zeros), outside every later query's window.
A chunked layer (Llama 4's local attention: a query sees a key only in its own chunk of C positions, k // C
== q // C) is kept the same way: its state holds the tokens of the prefix's last, unfinished chunk (n % C of
them, none when n is a multiple of C), and its mask is keyed by a Chunked(C) beside the windows.

New tokens of unequal length are padded on the left (so that every row's last column is a real token and
logits_to_keep=1 works); padding's K/V go to the SCRATCH block, which no table names. Linear-attention
layers (Qwen3.5) keep a per-row (conv, recurrent) state in slot buffers (small: never shared); they cannot be
padded into, so callers give them rows of equal length. A layer that reads another layer's
K/V (Gemma 4's shared layers: transformers gives them a DummyLayer, and the model hands them the K/V its
source layer's update returned) keeps nothing here, and its prefix is (None, None). Layers may differ in
K/V shape (Gemma 4's full-attention layers have their own head size and head count).

A block taken from the free list is zeroed before a row writes into it: masked keys still go through the
matmuls, and a probability of 0 times a stale NaN (another row's) is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, DynamicLayer, LinearAttentionLayer

from ..families.base import kv_shapes
from .blocks import BLOCK_SIZE, NULL, SCRATCH, BlockTables
from .kvpool import KVPool


@dataclass(eq=False)
class Prefix:
    """What a row continues from: per layer (K, V) [1, kv_heads, n, D] or a linear layer's (conv, recurrent)
    state (None, None for a fresh one), `tokens` long (sliding-window layers store only the last of them).
    `blocks`: per layer kind, the blocks of a KVPool that already hold the attention layers' K/V (a kept
    conversation's, decode.radix; the same pool's only); `kv` then holds only the linear layers' states."""

    kv: list
    tokens: int
    rope_delta: int = 0
    blocks: dict | None = None


@dataclass(frozen=True)
class Chunked:
    """The mask key of chunked local attention in chunks of `size` positions (the windows' keys are ints)."""

    size: int


CAPACITY_STEP = 256  # slots grow to the next multiple of this: few distinct shapes for compiled steps


def bucket(rows: int) -> int:
    """The row count a fixed-shape step runs with: 1, 2, 4, 8, 16, 32, ..."""
    return 1 << max(rows - 1, 0).bit_length()


def _grow(have: int, need: int, step: int) -> int:
    """A buffer dimension's new size: as it is if it fits, else at least doubled, in multiples of `step`."""
    if need <= have:
        return have
    size = max(need, 2 * have)
    return -(-size // step) * step


class RowsBook:
    """Per slot: the logical position of every cache position (-1: none), how many hold real tokens; and the
    layout of the forward in progress (where its tokens go, their positions, the attention biases)."""

    def __init__(self, device, windows: tuple, chunks: tuple = (), align: int = 1):
        self.device = device
        self.windows = windows  # the model's sliding windows (None: full attention)
        self.chunks = chunks  # the model's attention chunk sizes (chunked local attention)
        self.align = align  # a forward's span is a multiple of this (the K/V block size)
        self.keys = torch.full((0, 0), -1, dtype=torch.long, device=device)
        self.lengths: list[int] = []  # real tokens per running row (prefix included): its next logical position
        # Per row: the hole (logical position, size) its own tokens skip: they begin on a fresh block after the
        # prefix's partly filled last one (RowsCache.add). Its physical end follows from it (`ends`).
        self.holes: list[tuple[int, int]] = []
        self.prefixes: list[Prefix] = []
        # Set by begin() for the forward in progress:
        self.batch = 0  # rows in the forward (the running rows, or a fixed bucket of them)
        self.span = 0  # positions the layers look at
        self.write: torch.Tensor | None = None  # [batch, L] position each new token goes to
        self.valid: torch.Tensor | None = None  # [batch, L] which of them are real tokens (not padding, not idle)
        self.masks: dict = {}  # window or Chunked -> additive bias [batch, 1, g*L, span] (g folded in by the attention)
        self.queries: torch.Tensor | None = None  # [batch, L] logical positions of the forward's tokens

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def longest(self) -> int:
        return max(self.lengths, default=0)

    def next_logical(self) -> list[int]:
        """Each row's next logical position (its prefix and its real tokens before it)."""
        return list(self.lengths)

    @property
    def ends(self) -> list[int]:
        """Per row: where its next token goes (its physical end: its length past its hole)."""
        return [self.physical(i, n) for i, n in enumerate(self.lengths)]

    def physical(self, slot: int, position: int) -> int:
        """Where a row's logical `position` is (past its hole, if it is after it)."""
        at, size = self.holes[slot]
        return position + size if position >= at and size else position

    def begin(self, logical: torch.Tensor, counts: list[int], batch: int | None = None, span: int | None = None) -> None:
        """Lay out a forward's new tokens: `logical` [B, L] positions, `counts` real (unpadded, right-aligned)
        tokens per row. `batch`/`span`: a fixed shape (rows beyond the running ones are idle and write nothing
        that is read; span the whole capacity); by default the running rows and the positions in use."""
        rows, width = logical.shape
        batch = batch or rows
        ends = self.ends[:rows]
        need = max((n + width for n in ends), default=width)
        self.reserve(batch, need)
        device = self.device
        counts_t = torch.tensor(counts + [0] * (batch - rows), device=device)
        starts = torch.tensor(ends + [0] * (batch - rows), device=device)
        if batch > rows:
            logical = torch.cat([logical, logical.new_zeros(batch - rows, width)])
        column = torch.arange(width, device=device)
        valid = column.unsqueeze(0) >= (width - counts_t).unsqueeze(1)
        # Real tokens go right after the row's real tokens, padding after them (positions that stay marked empty).
        order = torch.remainder(column - (width - counts_t).unsqueeze(1), width)
        self.write, self.valid = starts.unsqueeze(1) + order, valid
        self.keys[:batch].scatter_(1, self.write, torch.where(valid, logical, torch.full_like(logical, -1)))
        for i, n in enumerate(counts):
            self.lengths[i] += n
        self.batch = batch
        self.span = span or -(-need // self.align) * self.align  # every position a row has written or writes now
        keys = self.keys[:batch, : self.span]
        self.masks = {window: _bias(keys, logical, window) for window in self.windows}
        self.masks.update({Chunked(size): _bias(keys, logical, None, size) for size in self.chunks})
        self.queries = logical

    def reserve(self, rows: int, length: int) -> bool:
        """Room for `rows` rows of `length`; True if the table of positions was reallocated."""
        have_rows, have_len = self.keys.shape
        if rows <= have_rows and length <= have_len:
            return False
        grown = self.keys.new_full((max(_grow(have_rows, rows, 1), 4), _grow(have_len, length, CAPACITY_STEP)), -1)
        grown[:have_rows, :have_len] = self.keys
        self.keys = grown
        return True


def _bias(keys: torch.Tensor, queries: torch.Tensor, window: int | None, chunk: int | None = None) -> torch.Tensor:
    """Additive float bias [B, 1, L, S]: 0 where a query may look, -inf where not. A query with nothing to look
    at (an idle row of a fixed-shape step) looks at slot 0, never at nothing (which gives NaN). `chunk`: chunked
    local attention, a key only in the query's own chunk (transformers' chunked_overlay, positions unpadded)."""
    q, k = queries.unsqueeze(-1), keys.unsqueeze(1)  # [B, L, 1], [B, 1, S]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed = allowed & (k > q - window)
    if chunk is not None:
        allowed = allowed & (torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor"))
    first = torch.zeros_like(allowed)
    first[..., 0] = True
    allowed = allowed | (first & ~allowed.any(dim=-1, keepdim=True))
    return torch.zeros(allowed.shape, device=keys.device).masked_fill(~allowed, float("-inf")).unsqueeze(1)


def shared_rows(bias: torch.Tensor, length: int) -> torch.Tensor:
    """The mask rows of a shared layer's queries: Gemma 4 runs only the last `length` tokens of a forward
    through its shared layers (those whose logits are kept; the layers write no K/V)."""
    return bias[:, :, bias.shape[2] - length:]


class RowsLayer(DynamicLayer):
    """An attention layer's K/V blocks [blocks, kv_heads, block_size, D] (in the KVPool), read through its
    kind's block tables; the forward sees the first `batch` rows and `span` positions. `sliding_window` or
    `chunk` (chunked local attention) say what later queries can still see of a row."""

    def __init__(self, book: RowsBook, tables: BlockTables, pool: KVPool, index: int, sliding_window: int | None = None,
                 chunk: int | None = None):
        super().__init__()
        self.book, self.tables, self.pool, self.index = book, tables, pool, index
        self.sliding_window, self.chunk = sliding_window, chunk
        self.is_initialized = True
        self.keys = self.values = None

    @property
    def _keys(self) -> torch.Tensor | None:
        return self.pool.keys.get(self.index)

    @property
    def _values(self) -> torch.Tensor | None:
        return self.pool.values.get(self.index)

    def get_seq_length(self) -> int:
        return self.book.span

    def update(self, key_states, value_states, *args, **kwargs):
        tables, keys, values = self.tables, self._keys, self._values
        keys[tables.write_block, :, tables.write_offset] = key_states.transpose(1, 2)
        values[tables.write_block, :, tables.write_offset] = value_states.transpose(1, 2)
        # The pool's tensors, not the rows' gathered K/V: RowsCache.attend gathers a few rows' blocks at a time
        # (GATHER_BUDGET), so no forward holds every row's positions at once. A shared layer (Gemma 4) is handed
        # these same tensors and reads them through its source kind's tables.
        return keys, values

    def tokens(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's K/V of logical positions `start` to `end` as fresh [1, kv_heads, n, D] tensors."""
        if self._keys is None or end <= start:
            heads, dim = self.pool.shapes[self.index]
            empty = torch.zeros(1, heads, max(end - start, 0), dim, dtype=self.pool.dtype, device=self.book.device)
            return empty, empty.clone()
        at, size = self.book.holes[slot]
        if size and start < at < end:  # on both sides of the row's hole: the two runs, joined
            (k1, v1), (k2, v2) = self.tokens(slot, start, at), self.tokens(slot, at, end)
            return torch.cat([k1, k2], dim=2), torch.cat([v1, v2], dim=2)
        start, end = self.book.physical(slot, start), self.book.physical(slot, end - 1) + 1
        block, offset = self.pool.where(self.tables.table[slot], start, end)
        return (self._keys[block, :, offset].transpose(0, 1).unsqueeze(0).contiguous(),
                self._values[block, :, offset].transpose(0, 1).unsqueeze(0).contiguous())


def _gather(pool: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The K or V of some rows [b, heads, nb * block_size, D] through their block tables `view` [b, nb] (`pool`
    [blocks, heads, block_size, D], maybe a view of some heads): the positions in a row's logical order, as the
    slot layout before had them (so the attention is unchanged)."""
    rows, blocks = view.shape
    _, heads, size, dim = pool.shape
    return pool[view].transpose(1, 2).reshape(rows, heads, blocks * size, dim)


GATHER_BUDGET = 16 * 2**20  # bytes an attention chunk's gathered K and V and float32 scores take at most (one
# row's one head may take more: the smallest chunk); docs/benchmarks-paged.md
# The same for a compiled step, larger: its chunk loop is unrolled into the graph, and 16 chunks a layer took
# inductor 203 s to compile against 34 s for one (thin 2B geometry, 16 rows, span 1024; docs/benchmarks-paged.md).
COMPILED_GATHER_BUDGET = 256 * 2**20
gathered: list[int] | None = None  # when a test sets it to a list: the bytes of every chunk's gathered K and V


def chunks(rows: int, heads: int, unit: int, budget: int | None = None) -> list[tuple[int, int, int, int]]:
    """(row start, row end, head start, head end) of the chunks an attention over `rows` rows of `heads` K/V
    heads runs in, a (row, head) costing `unit` bytes: whole rows while a row fits the budget, else one row a
    few heads at a time. Depends only on the shapes (a compiled step's are fixed)."""
    per = max((budget or GATHER_BUDGET) // max(unit, 1), 1)  # (row, head) pairs a chunk may take
    if per >= heads:
        step = per // heads
        return [(r, min(r + step, rows), 0, heads) for r in range(0, rows, step)]
    return [(r, r + 1, h, min(h + per, heads)) for r in range(rows) for h in range(0, heads, per)]


class RowsLinearLayer(LinearAttentionLayer):
    """A linear-attention layer whose per-row states live in slot buffers; the model sees the first B."""

    def bind(self, conv: torch.Tensor, recurrent: torch.Tensor, rows: int) -> None:
        self.conv_states[0], self.recurrent_states[0] = conv[:rows], recurrent[:rows]
        self.conv_kernel_size[0] = conv.shape[-1]
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True


class RowsCache(DynamicCache):
    """The cache of a batch of rows with their own prefixes (see the module docstring)."""

    def __init__(self, config, device, dtype: torch.dtype | None = None, block_size: int = BLOCK_SIZE,
                 pool: KVPool | None = None, fresh_rows: bool = False):
        super().__init__(config=config)
        text = config.get_text_config()
        # transformers builds a chunked layer's cache as a sliding one (window = the chunk size): only the
        # config's layer types tell them apart, and their masks differ.
        chunked = {i for i, kind in enumerate(getattr(text, "layer_types", None) or ()) if kind == "chunked_attention"}
        windows, chunks = {None}, set()
        layers = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (LinearAttentionLayer, DummyLayer)):
                if isinstance(layer, LinearAttentionLayer):
                    linear = RowsLinearLayer.__new__(RowsLinearLayer)
                    linear.__dict__.update(layer.__dict__)
                    layer = linear
                layers.append(layer)
                continue
            window = getattr(layer, "sliding_window", None)
            if i in chunked:
                chunks.add(window)
                layers.append((None, window))
            else:
                windows.add(window)
                layers.append((window, None))
        self._shapes = kv_shapes(text)  # per layer: (kv_heads, head_dim)
        # The layers of a kind (full, each window, each chunk size) keep the same positions of a row, so one block
        # id names them in each: one block pool and one set of block tables per kind.
        kind_layers: dict[tuple, list[int]] = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, tuple):
                kind_layers.setdefault(layer, []).append(i)
        # fresh_rows: rows begin their own tokens on a fresh block (no copy of the prefix's partly filled last
        # block; a hole the masks skip). Off where a row's blocks become chains of token ids, which must be
        # contiguous (the server's kept conversations in decode.radix, its n > 1 choices' prefixes).
        self.fresh_rows = fresh_rows
        if pool is None:
            pool = KVPool(kind_layers, self._shapes, block_size, device, dtype)
        elif pool.kind_layers != kind_layers or pool.shapes != self._shapes:
            raise ValueError("the K/V pool was made for another model's layers")
        self.pool = pool
        self.book = RowsBook(device, tuple(sorted(windows, key=lambda w: -1 if w is None else w)), tuple(sorted(chunks)),
                             align=pool.block_size)
        self.kinds: dict[tuple, BlockTables] = {}
        for kind in kind_layers:
            tables = self.kinds[kind] = BlockTables(pool.pools[kind], device)
            tables.zero = lambda block, kind=kind: pool.zero(kind, block)
            tables.copy = lambda source, target, kind=kind: pool.copy(kind, source, target)
        for kind, indices in kind_layers.items():
            for i in indices:
                layers[i] = RowsLayer(self.book, self.kinds[kind], pool, i, *kind)
        self.layers = layers
        self._linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> slot buffers (conv, recurrent)
        self._dtype = dtype

    @property
    def rows(self) -> int:
        return self.book.rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.book.span

    def attention_layers(self):
        return [(i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, RowsLayer)]

    # -- rows in and out ---------------------------------------------------------------------------------------

    @torch.inference_mode()  # the batch's buffers are inference tensors: written only in inference mode
    def add(self, prefix: Prefix) -> int:
        """A new row starting from `prefix`: it references the prefix's blocks (written into the pool by the
        first row that uses it) and owns only blocks of its own tokens; returns its slot."""
        self._check(prefix)
        slot = self.rows
        book = self.book
        tokens = prefix.tokens
        end = -(-tokens // self.pool.block_size) * self.pool.block_size if self.fresh_rows else tokens
        self._reserve(slot + 1, end + 1, prefix)
        held = self.pool.hold(prefix)
        book.prefixes.append(prefix)
        book.lengths.append(tokens)
        book.holes.append((tokens, end - tokens))
        book.keys[slot] = -1
        book.keys[slot, :tokens] = torch.arange(tokens, device=book.device)
        for kind, tables in self.kinds.items():
            tables.share_row(held.blocks[kind])
        for i, (a, b) in enumerate(prefix.kv):
            if isinstance(self.layers[i], RowsLinearLayer) and a is not None:
                self._set_linear(i, slot, a[0], b[0])
        self._bind()
        return slot

    def _check(self, prefix: Prefix) -> None:
        """Refuse, before anything is written, a prefix whose layers do not fit this cache (a forged state):
        so it fails its own row and no other."""
        if len(prefix.kv) != len(self.layers):
            raise ValueError(f"the state has {len(prefix.kv)} layers, the model {len(self.layers)}")
        for i, ((a, b), layer) in enumerate(zip(prefix.kv, self.layers)):
            heads, dim = self._shapes[i]
            if isinstance(layer, DummyLayer):
                if a is not None or b is not None:
                    raise ValueError(f"layer {i} reads another layer's K/V and keeps none, the state holds some")
                continue
            if isinstance(layer, RowsLinearLayer):
                if a is not None and i in self._linear and (a.shape[1:] != self._linear[i][0].shape[1:]
                                                             or b.shape[1:] != self._linear[i][1].shape[1:]):
                    raise ValueError(f"layer {i}: a linear state of another shape")
                continue
            if prefix.blocks is not None:  # K/V already in the pool's blocks
                continue
            if a is None or b is None or a.dim() != 4 or a.shape != b.shape:
                raise ValueError(f"layer {i}: no K/V of one shape")
            if a.shape[0] != 1 or a.shape[1] != heads or a.shape[3] != dim or a.shape[2] > prefix.tokens:
                raise ValueError(f"layer {i}: K/V of shape {list(a.shape)}, the model takes [1, {heads}, <= {prefix.tokens}, {dim}]")
            if self._dtype is not None and a.dtype != self._dtype:
                raise ValueError(f"layer {i}: K/V in {a.dtype}, the model computes in {self._dtype}")

    @torch.inference_mode()
    def adopt(self, other: "RowsCache", other_slot: int) -> int:
        """Move a row from another cache (where it was prefilled) into this one; returns its new slot. On the same
        pool its blocks are referenced (the other cache still holds them until its row is removed); otherwise its
        prefix's blocks are this pool's (written once here) and its own blocks copied."""
        prefix, length = other.book.prefixes[other_slot], other.book.lengths[other_slot]
        end = other.book.physical(other_slot, length)
        slot = self.rows
        book = self.book
        self._reserve(slot + 1, end + 1, like=other)
        same = other.pool is self.pool
        held = self.pool.hold(prefix)
        book.prefixes.append(prefix)
        book.lengths.append(length)
        book.holes.append(other.book.holes[other_slot])
        book.keys[slot] = -1
        book.keys[slot, :end] = other.book.keys[other_slot, :end]
        for kind, tables in self.kinds.items():
            theirs = other.kinds[kind].rows[other_slot]
            if same:
                tables.share_row(theirs)
                continue
            their_prefix, mine = other.pool.held[prefix].blocks[kind], held.blocks[kind]
            blocks = []
            for j, block in enumerate(theirs):
                if block == NULL:
                    blocks.append(NULL)
                elif j < len(their_prefix) and block == their_prefix[j]:
                    tables.pool.hold(mine[j])
                    blocks.append(mine[j])
                else:
                    fresh = tables.pool.allocate()
                    for i in self.pool.kind_layers[kind]:
                        self.pool.keys[i][fresh] = other.pool.keys[i][block]
                        self.pool.values[i][fresh] = other.pool.values[i][block]
                    blocks.append(fresh)
            tables.add_row(blocks)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RowsLinearLayer):
                conv, recurrent = other.layers[i].conv_states[0], other.layers[i].recurrent_states[0]
                self._set_linear(i, slot, conv[other_slot], recurrent[other_slot])
        self._bind()
        return slot

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        """Drop a row, releasing its blocks; the last row moves into its slot (so the running rows stay the first
        B slots): its block table moves, no K/V is copied."""
        last = self.rows - 1
        book = self.book
        prefix = book.prefixes[slot]
        for tables in self.kinds.values():
            tables.remove_row(slot)
        if slot != last:
            book.keys[slot] = book.keys[last]
            book.lengths[slot], book.prefixes[slot] = book.lengths[last], book.prefixes[last]
            book.holes[slot] = book.holes[last]
            for i in self._linear:
                for buffer in self._linear[i]:
                    buffer[slot] = buffer[last]
        book.keys[last] = -1
        book.lengths.pop()
        book.holes.pop()
        book.prefixes.pop()
        self.pool.release(prefix)
        self._bind()

    @torch.inference_mode()
    def close(self) -> None:
        """Remove every row (their blocks back to the pool: a batch on a shared pool must be closed)."""
        for slot in reversed(range(self.rows)):
            self.remove(slot)

    @torch.inference_mode()
    def truncate(self, slot: int, length: int) -> None:
        """Cut a row back to its first `length` tokens (attention layers; linear states are restored apart)."""
        book = self.book
        at, _ = book.holes[slot]
        # Back into the prefix: no own token is left, none skips the hole any more. Back to its very end (a
        # conversation's first turn boundary) the hole stays: the next tokens go on the fresh block, no copy.
        if length < at:
            book.holes[slot] = (at, 0)
        end = book.physical(slot, length)
        book.keys[slot, end:] = -1
        book.lengths[slot] = length

    @torch.inference_mode()
    def set_linear_states(self, slot: int, states: list) -> None:
        """Give a row the (conv, recurrent) states [1, ...] of the linear layers, in layer order."""
        linear = iter(states)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RowsLinearLayer):
                conv, recurrent = next(linear)
                if conv is not None:
                    self._set_linear(i, slot, conv[0], recurrent[0])
        self._bind()

    def row_state(self, slot: int, start: int = 0, length: int | None = None) -> list:
        """A row's state per layer: K/V [1, kv_heads, n, D] of tokens start..start+length (all by default),
        a sliding layer's only as far back as its window reaches; a linear layer's (conv, recurrent)."""
        end = self.book.lengths[slot] if length is None else start + length
        out = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RowsLayer):
                window, chunk = layer.sliding_window, layer.chunk
                first = start
                if window and start == 0:
                    first = max(start, end - (window - 1))
                elif chunk and start == 0:
                    first = end // chunk * chunk  # the next query's chunk: no earlier key is seen again
                out.append(layer.tokens(slot, first, end))
            elif i in self._linear:
                out.append(tuple(b[slot : slot + 1].clone() for b in self._linear[i]))
            else:
                out.append((None, None))
        return out

    def linear_state(self, slot: int) -> list:
        """A row's linear layers' (conv, recurrent) states (copies), (None, None) for every other layer."""
        return [tuple(b[slot : slot + 1].clone() for b in self._linear[i]) if i in self._linear else (None, None)
                for i in range(len(self.layers))]

    def suffix_kv(self, slot: int, length: int) -> list:
        """A row's first `length` tokens after its prefix, per attention layer ([1, kv_heads, length, D])."""
        start = self.book.prefixes[slot].tokens
        return [layer.tokens(slot, start, start + length) if isinstance(layer, RowsLayer) else (None, None)
                for layer in self.layers]

    def _reserve(self, rows: int, length: int, prefix: Prefix | None = None, like: "RowsCache | None" = None) -> None:
        self.book.reserve(rows, length)
        template = None  # what gives the blocks their dtype (the model's, or the first state's)
        if prefix is not None:
            template = next((k for k, _ in prefix.kv if k is not None and k.dim() == 4), None)
        if like is not None:
            template = next((layer._keys for _, layer in like.attention_layers() if layer._keys is not None), None)
        self.pool.set_dtype(template.dtype if template is not None else None)
        self.pool.ensure()
        for tables in self.kinds.values():
            tables.reserve(self.book.keys.shape[0], self.book.capacity // tables.block_size)
        for i, (conv, recurrent) in list(self._linear.items()):
            if conv.shape[0] < self.book.keys.shape[0]:
                self._set_linear(i, 0, conv[0], recurrent[0])  # grows the slot buffers (slot 0 rewritten as it is)

    # -- blocks ------------------------------------------------------------------------------------------------

    def begin(self, logical: torch.Tensor, counts: list[int], batch: int | None = None, span: int | None = None) -> None:
        """Lay out a forward (RowsBook.begin) and where its K/V go: blocks of their own for the positions the rows
        write (a shared block copied first), the padding's and idle rows' K/V into the SCRATCH block."""
        starts = self.book.ends[: len(counts)]
        for tables in self.kinds.values():
            for i, n in enumerate(counts):
                tables.writable(i, starts[i], starts[i] + n)
        book = self.book
        book.begin(logical, counts, batch, span)
        self.pool.ensure()
        for tables in self.kinds.values():
            size = tables.block_size
            tables.reserve(book.keys.shape[0], book.capacity // size)
            rows = tables.table[: book.batch]
            tables.write_block = torch.where(book.valid, rows.gather(1, book.write // size), SCRATCH)
            tables.write_offset = book.write % size
            tables.view = rows[:, : book.span // size]

    def block_stats(self) -> dict:
        """The pool's blocks per layer kind (KVPool.stats)."""
        return self.pool.stats()

    def _set_linear(self, i: int, slot: int, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        buffers = self._linear.get(i)
        size = self.book.keys.shape[0]
        if buffers is None or size > buffers[0].shape[0]:
            # In the model's dtypes, never the first row's: one row's state must not decide every row's precision.
            recurrent_dtype = torch.float32 if recurrent.numel() else recurrent.dtype
            grown = (conv.new_zeros((size, *conv.shape), dtype=self._dtype or conv.dtype),
                     recurrent.new_zeros((size, *recurrent.shape), dtype=recurrent_dtype))
            if buffers is not None:
                grown[0][: buffers[0].shape[0]] = buffers[0]
                grown[1][: buffers[1].shape[0]] = buffers[1]
            self._linear[i] = buffers = grown
        buffers[0][slot].copy_(conv)
        buffers[1][slot].copy_(recurrent)

    def _bind(self, rows: int | None = None) -> None:
        for i, (conv, recurrent) in self._linear.items():
            self.layers[i].bind(conv, recurrent, rows or self.rows)

    # -- attention ---------------------------------------------------------------------------------------------

    def mask_key(self, layer_idx: int | None, window: int | None):
        """Which of the forward's masks a layer uses: its chunk's for a chunked layer (the model's attention
        passes no window for those), else the window the attention passes."""
        chunk = getattr(self.layers[layer_idx], "chunk", None) if layer_idx is not None and layer_idx < len(self.layers) else None
        return Chunked(chunk) if chunk else window

    def attend(self, query, key, value, scaling, window, layer_idx: int | None = None):
        """query [B, Hq, L, D], key/value the pool's blocks [blocks, Hkv, block_size, D] (RowsLayer.update) -> [B, L, Hq, D].

        transformers' eager attention, numerically: matmuls in the model dtype, softmax in float32; grouped
        query heads folded into the query dimension so K/V are never repeated. The rows' blocks are gathered a
        chunk of rows (or of one row's heads) at a time (`chunks`), each chunk's output computed as the whole
        batch's would be, so every row computes what it computes alone."""
        batch, q_heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = q_heads // kv_heads
        scale = scaling if scaling is not None else dim**-0.5
        q = query.reshape(batch, kv_heads, groups * length, dim)
        mask = self.mask_key(layer_idx, window)
        bias = self.book.masks[mask]  # [B, 1, L, S]: broadcast, never copied
        if layer_idx is not None and isinstance(self.layers[layer_idx], DummyLayer):
            bias = shared_rows(bias, length)
        # The tables of the layer kind whose blocks these are (a shared layer's are its source's, of its kind).
        view = self.kinds[(None, mask.size) if isinstance(mask, Chunked) else (mask, None)].view
        span = view.shape[1] * key.shape[2]
        unit = span * (2 * dim * key.element_size() + groups * length * (8 + 2 * value.element_size()))
        rows_out: list[list[torch.Tensor]] = []  # per chunk of rows, its outputs by chunk of heads
        budget = COMPILED_GATHER_BUDGET if torch.compiler.is_compiling() else GATHER_BUDGET
        for r0, r1, h0, h1 in chunks(batch, kv_heads, unit, budget):
            rows = view[r0:r1]
            k, v = _gather(key[:, h0:h1], rows), _gather(value[:, h0:h1], rows)
            if gathered is not None:
                gathered.append(k.nbytes + v.nbytes)
            out = _attend(q[r0:r1, h0:h1], k, v, bias[r0:r1], scale, groups, length)
            if h0 == 0:
                rows_out.append([out])
            else:
                rows_out[-1].append(out)
        parts = [p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in rows_out]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [B, Hkv, g*L, D]
        return out.reshape(batch, q_heads, length, dim).transpose(1, 2).contiguous()


def _attend(q, key, value, bias, scale, groups: int, length: int) -> torch.Tensor:
    """One chunk: q [b, h, g*L, D], key/value [b, h, S, D], bias [b, 1, L, S] -> [b, h, g*L, D]."""
    batch, kv_heads = q.shape[:2]
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale
    span = scores.shape[-1]
    scores = (scores.view(batch, kv_heads, groups, length, span) + bias.unsqueeze(2)).view(batch, kv_heads, groups * length, span)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value)
