"""A batch of independent rows: each row continues from its own prefix, in a slot of its own.

Rows join and leave between forwards. A row's slot in every attention layer's buffer [rows, kv_heads,
capacity, D] holds its prefix (an image state's K/V, copied in when the row joins) followed by its own tokens
(question and answer so far). Copying the prefix, rather than referencing it from the attention, is what
makes every forward one batched attention over fixed-shape buffers: no per-prefix grouping in Python, so a
decode step has the same shapes from one token to the next and can be compiled and captured as a CUDA graph
(docs/benchmarks.md measures the copy against the step). A row that leaves is replaced by the last one, so
the running rows are always the first B slots.

Which keys a query sees is decided from logical positions (a row's unpadded sequence index), kept per slot
in `RowsBook.keys` (-1: empty): padding, causality and sliding windows give each row exactly what it would
compute alone. A sliding-window layer's state holds only the last window - 1 prefix tokens; they are copied
to the slots of their positions and the slots before them stay zero, outside every later query's window.
A chunked layer (Llama 4's local attention: a query sees a key only in its own chunk of C positions, k // C
== q // C) is kept the same way: its state holds the tokens of the prefix's last, unfinished chunk (n % C of
them, none when n is a multiple of C), and its mask is keyed by a Chunked(C) beside the windows.

New tokens of unequal length are padded on the left (so that every row's last column is a real token and
logits_to_keep=1 works); padding is written after the row's real tokens, in slots marked empty, and is
overwritten later. Linear-attention layers (Qwen3.5) keep a per-row (conv, recurrent) state in slot buffers;
they cannot be padded into, so callers give them rows of equal length. A layer that reads another layer's
K/V (Gemma 4's shared layers: transformers gives them a DummyLayer, and the model hands them the K/V its
source layer's update returned) keeps nothing here, and its prefix is (None, None). Layers may differ in
K/V shape (Gemma 4's full-attention layers have their own head size and head count).

Slots a previous row wrote past the new occupant's length are zeroed when the slot changes hands: masked
keys still go through the matmuls, and a probability of 0 times a stale NaN is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, DynamicLayer, LinearAttentionLayer

from ..families.base import kv_shapes


@dataclass(eq=False)
class Prefix:
    """What a row continues from: per layer (K, V) [1, kv_heads, n, D] or a linear layer's (conv, recurrent)
    state (None, None for a fresh one), `tokens` long (sliding-window layers store only the last of them)."""

    kv: list
    tokens: int
    rope_delta: int = 0


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
    """Per slot: the logical position of every cache slot (-1: none), how many slots hold real tokens; and the
    layout of the forward in progress (where its tokens go, their positions, the attention biases)."""

    def __init__(self, device, windows: tuple, chunks: tuple = ()):
        self.device = device
        self.windows = windows  # the model's sliding windows (None: full attention)
        self.chunks = chunks  # the model's attention chunk sizes (chunked local attention)
        self.keys = torch.full((0, 0), -1, dtype=torch.long, device=device)
        self.lengths: list[int] = []  # real tokens per running row (prefix included)
        self.dirty: list[int] = []  # per slot: slots written so far (zeroed when the slot changes hands)
        self.prefixes: list[Prefix] = []
        # Set by begin() for the forward in progress:
        self.batch = 0  # rows in the forward (the running rows, or a fixed bucket of them)
        self.span = 0  # slots the layers look at
        self.write: torch.Tensor | None = None  # [batch, L] slot each new token goes to
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

    def begin(self, logical: torch.Tensor, counts: list[int], batch: int | None = None, span: int | None = None) -> None:
        """Lay out a forward's new tokens: `logical` [B, L] positions, `counts` real (unpadded, right-aligned)
        tokens per row. `batch`/`span`: a fixed shape (rows beyond the running ones are idle and write nothing
        that is read; span the whole capacity); by default the running rows and the slots in use."""
        rows, width = logical.shape
        batch = batch or rows
        need = max((n + width for n in self.lengths[:rows]), default=width)
        self.reserve(batch, need)
        device = self.device
        counts_t = torch.tensor(counts + [0] * (batch - rows), device=device)
        starts = torch.tensor(self.lengths[:rows] + [0] * (batch - rows), device=device)
        if batch > rows:
            logical = torch.cat([logical, logical.new_zeros(batch - rows, width)])
        column = torch.arange(width, device=device)
        valid = column.unsqueeze(0) >= (width - counts_t).unsqueeze(1)
        # Real tokens go right after the row's real tokens, padding after them (slots that stay marked empty).
        order = torch.remainder(column - (width - counts_t).unsqueeze(1), width)
        self.write = starts.unsqueeze(1) + order
        self.keys[:batch].scatter_(1, self.write, torch.where(valid, logical, torch.full_like(logical, -1)))
        for i in range(batch):
            self.dirty[i] = max(self.dirty[i], (self.lengths[i] if i < rows else 0) + width)
        for i, n in enumerate(counts):
            self.lengths[i] += n
        self.batch = batch
        self.span = span or need  # every slot a row has written or writes now
        keys = self.keys[:batch, : self.span]
        self.masks = {window: _bias(keys, logical, window) for window in self.windows}
        self.masks.update({Chunked(size): _bias(keys, logical, None, size) for size in self.chunks})
        self.queries = logical

    def reserve(self, rows: int, length: int) -> bool:
        """Room for `rows` slots of `length`; True if the buffers were reallocated."""
        have_rows, have_len = self.keys.shape
        while len(self.dirty) < rows:
            self.dirty.append(0)
        if rows <= have_rows and length <= have_len:
            return False
        grown = self.keys.new_full((max(_grow(have_rows, rows, 1), 4), _grow(have_len, length, CAPACITY_STEP)), -1)
        grown[:have_rows, :have_len] = self.keys
        self.keys = grown
        while len(self.dirty) < grown.shape[0]:
            self.dirty.append(0)
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
    """An attention layer's buffers for all slots; the forward sees the first `batch` rows and `span` slots.
    `sliding_window` or `chunk` (chunked local attention) say what later queries can still see of a row."""

    def __init__(self, book: RowsBook, sliding_window: int | None = None, chunk: int | None = None):
        super().__init__()
        self.book, self.sliding_window, self.chunk = book, sliding_window, chunk
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.is_initialized = True
        self.keys = self.values = None

    def get_seq_length(self) -> int:
        return self.book.span

    def update(self, key_states, value_states, *args, **kwargs):
        book = self.book
        self.reserve(key_states, book.keys.shape[0], book.capacity)
        rows = torch.arange(book.batch, device=key_states.device).unsqueeze(1)
        self._keys[rows, :, book.write] = key_states.transpose(1, 2)
        self._values[rows, :, book.write] = value_states.transpose(1, 2)
        return self._keys[: book.batch, :, : book.span], self._values[: book.batch, :, : book.span]

    def reserve(self, like: torch.Tensor, rows: int, length: int) -> None:
        if self._keys is not None and rows <= self._keys.shape[0] and length <= self._keys.shape[2]:
            return
        old = self._keys.shape if self._keys is not None else (0, like.shape[1], 0, like.shape[-1])
        shape = (max(rows, old[0]), like.shape[1], max(length, old[2]), like.shape[-1])
        for name in ("_keys", "_values"):
            # Zeros, not empty memory: masked slots still go through the matmuls, and 0 * NaN garbage is NaN.
            buffer = like.new_zeros(shape)
            if getattr(self, name) is not None:
                buffer[: old[0], :, : old[2]] = getattr(self, name)
            setattr(self, name, buffer)

    def put(self, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write [kv_heads, n, D] K/V into a slot from `start` on."""
        n = keys.shape[-2]
        self._keys[slot, :, start : start + n] = keys
        self._values[slot, :, start : start + n] = values

    def clear(self, slot: int, start: int, end: int) -> None:
        if end > start:
            self._keys[slot, :, start:end] = 0
            self._values[slot, :, start:end] = 0

    def tokens(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's K/V from `start` to `end` as fresh [1, kv_heads, n, D] tensors."""
        return self._keys[slot : slot + 1, :, start:end].clone(), self._values[slot : slot + 1, :, start:end].clone()

    def copy_slot(self, source: "RowsLayer", source_slot: int, slot: int, length: int) -> None:
        if length:
            self._keys[slot, :, :length] = source._keys[source_slot, :, :length]
            self._values[slot, :, :length] = source._values[source_slot, :, :length]


class RowsLinearLayer(LinearAttentionLayer):
    """A linear-attention layer whose per-row states live in slot buffers; the model sees the first B."""

    def bind(self, conv: torch.Tensor, recurrent: torch.Tensor, rows: int) -> None:
        self.conv_states[0], self.recurrent_states[0] = conv[:rows], recurrent[:rows]
        self.conv_kernel_size[0] = conv.shape[-1]
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True


class RowsCache(DynamicCache):
    """The cache of a batch of rows with their own prefixes (see the module docstring)."""

    def __init__(self, config, device, dtype: torch.dtype | None = None):
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
        self.book = RowsBook(device, tuple(sorted(windows, key=lambda w: -1 if w is None else w)), tuple(sorted(chunks)))
        self.layers = [RowsLayer(self.book, *layer) if isinstance(layer, tuple) else layer for layer in layers]
        self._linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> slot buffers (conv, recurrent)
        self._shapes = kv_shapes(text)  # per layer: (kv_heads, head_dim)
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
        """A new row starting from `prefix` (its K/V copied into the row's slot); returns its slot."""
        self._check(prefix)
        slot = self.rows
        book = self.book
        tokens = prefix.tokens
        self._reserve(slot + 1, tokens + 1, prefix)
        book.prefixes.append(prefix)
        book.lengths.append(tokens)
        book.keys[slot] = -1
        book.keys[slot, :tokens] = torch.arange(tokens, device=book.device)
        for i, (a, b) in enumerate(prefix.kv):
            layer = self.layers[i]
            if isinstance(layer, RowsLayer):
                stored = a.shape[-2] if a is not None else 0
                layer.clear(slot, 0, tokens - stored)  # positions a sliding layer does not keep
                if stored:
                    layer.put(slot, tokens - stored, a[0], b[0])
                layer.clear(slot, tokens, book.dirty[slot])
            elif isinstance(layer, RowsLinearLayer) and a is not None:
                self._set_linear(i, slot, a[0], b[0])
        book.dirty[slot] = tokens
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
            if a is None or b is None or a.dim() != 4 or a.shape != b.shape:
                raise ValueError(f"layer {i}: no K/V of one shape")
            if a.shape[0] != 1 or a.shape[1] != heads or a.shape[3] != dim or a.shape[2] > prefix.tokens:
                raise ValueError(f"layer {i}: K/V of shape {list(a.shape)}, the model takes [1, {heads}, <= {prefix.tokens}, {dim}]")
            if self._dtype is not None and a.dtype != self._dtype:
                raise ValueError(f"layer {i}: K/V in {a.dtype}, the model computes in {self._dtype}")

    @torch.inference_mode()
    def adopt(self, other: "RowsCache", other_slot: int) -> int:
        """Move a row from another cache (where it was prefilled) into this one; returns its new slot."""
        prefix, length = other.book.prefixes[other_slot], other.book.lengths[other_slot]
        slot = self.rows
        book = self.book
        self._reserve(slot + 1, length + 1, like=other)
        book.prefixes.append(prefix)
        book.lengths.append(length)
        book.keys[slot] = -1
        book.keys[slot, :length] = other.book.keys[other_slot, :length]
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RowsLayer):
                layer.copy_slot(other.layers[i], other_slot, slot, length)
                layer.clear(slot, length, book.dirty[slot])
            elif isinstance(layer, RowsLinearLayer):
                conv, recurrent = other.layers[i].conv_states[0], other.layers[i].recurrent_states[0]
                self._set_linear(i, slot, conv[other_slot], recurrent[other_slot])
        book.dirty[slot] = length
        self._bind()
        return slot

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        """Drop a row; the last row moves into its slot (so the running rows stay the first B slots)."""
        last = self.rows - 1
        book = self.book
        if slot != last:
            length = book.lengths[last]
            book.keys[slot] = book.keys[last]
            book.lengths[slot], book.prefixes[slot] = length, book.prefixes[last]
            for i, layer in enumerate(self.layers):
                if isinstance(layer, RowsLayer):
                    layer.copy_slot(layer, last, slot, length)
                    layer.clear(slot, length, book.dirty[slot])
                elif i in self._linear:
                    for buffer in self._linear[i]:
                        buffer[slot] = buffer[last]
            book.dirty[slot] = length
        book.keys[last] = -1
        book.lengths.pop()
        book.prefixes.pop()
        self._bind()

    @torch.inference_mode()
    def truncate(self, slot: int, length: int) -> None:
        """Cut a row back to its first `length` tokens (attention layers; linear states are restored apart)."""
        book = self.book
        book.keys[slot, length:] = -1
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

    def suffix_kv(self, slot: int, length: int) -> list:
        """A row's first `length` tokens after its prefix, per attention layer ([1, kv_heads, length, D])."""
        start = self.book.prefixes[slot].tokens
        return [layer.tokens(slot, start, start + length) if isinstance(layer, RowsLayer) else (None, None)
                for layer in self.layers]

    def _reserve(self, rows: int, length: int, prefix: Prefix | None = None, like: "RowsCache | None" = None) -> None:
        self.book.reserve(rows, length)
        template = None  # what gives the buffers their dtype (the model's, or the first state's)
        if prefix is not None:
            template = next((k for k, _ in prefix.kv if k is not None and k.dim() == 4), None)
        if like is not None:
            template = next((layer._keys for _, layer in like.attention_layers() if layer._keys is not None), None)
        for i, layer in self.attention_layers():
            source = template if template is not None else layer._keys
            dtype = source.dtype if source is not None else self._dtype
            heads, dim = self._shapes[i]
            shape_source = torch.empty(1, heads, 0, dim, dtype=dtype, device=self.book.device)
            layer.reserve(shape_source, self.book.keys.shape[0], self.book.capacity)

        for i, (conv, recurrent) in list(self._linear.items()):
            if conv.shape[0] < self.book.keys.shape[0]:
                self._set_linear(i, 0, conv[0], recurrent[0])  # grows the slot buffers (slot 0 rewritten as it is)

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
        """query [B, Hq, L, D], key/value [B, Hkv, S, D] (each row's slots) -> [B, L, Hq, D].

        transformers' eager attention, numerically: matmuls in the model dtype, softmax in float32; grouped
        query heads folded into the query dimension so K/V are never repeated."""
        batch, q_heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = q_heads // kv_heads
        scale = scaling if scaling is not None else dim**-0.5
        q = query.reshape(batch, kv_heads, groups * length, dim)
        bias = self.book.masks[self.mask_key(layer_idx, window)]  # [B, 1, L, S]: broadcast, never copied
        if layer_idx is not None and isinstance(self.layers[layer_idx], DummyLayer):
            bias = shared_rows(bias, length)
        scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale
        span = scores.shape[-1]
        scores = (scores.view(batch, kv_heads, groups, length, span) + bias.unsqueeze(2)).view(batch, kv_heads, groups * length, span)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out = torch.matmul(probs, value)
        return out.reshape(batch, q_heads, length, dim).transpose(1, 2).contiguous()
