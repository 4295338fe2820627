"""A batch of independent rows for continuous batching: each row continues from its own prefix.

Rows join and leave between steps. Every row has a prefix (an image state's K/V, shared read-only by all
rows that continue from it and never copied, or none for text-only rows) and a suffix of its own (question
and answer so far) in a per-layer buffer [rows, kv_heads, capacity, D]. Row i lives in slot i; a row that
leaves is replaced by the last one, so the running rows are always the first B slots (views, no gathers).

Attention handles rows with different prefixes by grouping inside the step: for each distinct prefix,
the queries of the rows on it are scored against it in one matmul (rows and grouped heads folded into the
query dimension, as in vlcache.attention); every row is scored against its own suffix in one batched
matmul, masked by the logical position of each suffix slot (-1: empty or padding). One softmax per row
runs over its prefix and its suffix together, in float32, as transformers' eager attention does.

New tokens of unequal length are padded on the left (so that every row's last column is a real token and
logits_to_keep=1 works); padding is written after the row's real tokens, in slots marked empty, and is
overwritten later. Linear-attention layers (Qwen3.5) keep a per-row (conv, recurrent) state in slot
buffers too; they cannot be padded into, so callers give them rows of equal length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer


@dataclass(eq=False)
class Prefix:
    """What a row continues from: per layer (K, V) [1, kv_heads, n, D] or a linear layer's (conv, recurrent)
    state (None, None for a fresh one), `tokens` long (sliding-window layers store only the last of them)."""

    kv: list
    tokens: int
    rope_delta: int = 0


@dataclass
class _Group:
    prefix: Prefix
    rows: slice | torch.Tensor  # the rows continuing from it


class RowsBook:
    """Per slot: how many suffix slots hold real tokens, and each suffix slot's logical position (-1: none)."""

    def __init__(self, device):
        self.device = device
        self.keys = torch.full((0, 0), -1, dtype=torch.long, device=device)
        self.lengths: list[int] = []
        self.prefixes: list[Prefix] = []
        # Set by begin() for the forward in progress:
        self.queries: torch.Tensor | None = None  # [B, L] logical positions of the new tokens
        self.write: torch.Tensor | None = None  # [B, L] suffix slot each new token goes to
        self.span = 0  # suffix slots the layers look at this forward
        self.groups: list[_Group] = []
        self.masks: dict = {}

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def longest(self) -> int:
        """Prefix and suffix tokens of the longest row (what transformers asks a cache's length for masks)."""
        return max((p.tokens + n for p, n in zip(self.prefixes, self.lengths)), default=0)

    def next_logical(self) -> torch.Tensor:
        """[B, 1]: each row's next logical position (its prefix and its real suffix tokens before it)."""
        return torch.tensor([[p.tokens + n] for p, n in zip(self.prefixes, self.lengths)], device=self.device)

    def begin(self, logical: torch.Tensor, valid: torch.Tensor) -> None:
        """Lay out a forward's new tokens: `logical` [B, L] positions, `valid` [B, L] False for left padding."""
        rows, width = logical.shape
        counts = valid.sum(dim=1)
        pads = width - counts
        starts = torch.tensor(self.lengths, device=self.device)
        # Real tokens go right after the row's suffix, padding after them (slots that stay marked empty).
        order = torch.remainder(torch.arange(width, device=self.device) - pads.unsqueeze(1), width)
        self.write = starts.unsqueeze(1) + order
        self.span = int(starts.max()) + width if rows else 0
        self._reserve(rows, self.span)
        self.keys.scatter_(1, self.write, torch.where(valid, logical, torch.full_like(logical, -1)))
        self.lengths = [n + int(c) for n, c in zip(self.lengths, counts)]
        self.queries = logical
        self.masks = {}
        self.groups = _groups(self.prefixes, self.device)

    def _reserve(self, rows: int, length: int) -> None:
        have_rows, have_len = self.keys.shape
        if rows <= have_rows and length <= have_len:
            return
        grown = self.keys.new_full((_grow(have_rows, rows), _grow(have_len, length)), -1)
        grown[:have_rows, :have_len] = self.keys
        self.keys = grown


def _grow(have: int, need: int) -> int:
    """A buffer dimension's new size: as it is if it fits, else doubled (at least `need`, at least 16)."""
    return have if need <= have else max(need, 2 * have, 16)


def _groups(prefixes: list[Prefix], device) -> list[_Group]:
    """Rows by prefix, as slices where they are contiguous (the usual case) and index tensors otherwise."""
    where: dict[int, list[int]] = {}
    owner: dict[int, Prefix] = {}
    for i, prefix in enumerate(prefixes):
        where.setdefault(id(prefix), []).append(i)
        owner[id(prefix)] = prefix
    groups = []
    for key, rows in where.items():
        if rows[-1] - rows[0] + 1 == len(rows):
            groups.append(_Group(owner[key], slice(rows[0], rows[-1] + 1)))
        else:
            groups.append(_Group(owner[key], torch.tensor(rows, device=device)))
    return groups


class RowsLayer(DynamicLayer):
    """An attention layer's suffix buffers for all slots; `keys`/`values` are views of the running rows."""

    def __init__(self, book: RowsBook, index: int):
        super().__init__()
        self.book, self.index = book, index
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.is_initialized = True
        self.keys = self.values = None

    def get_seq_length(self) -> int:
        return self.book.longest()

    def update(self, key_states, value_states, *args, **kwargs):
        book = self.book
        self._reserve(key_states, book.rows, book.span)
        rows = torch.arange(book.rows, device=key_states.device).unsqueeze(1)
        self._keys[rows, :, book.write] = key_states.transpose(1, 2)
        self._values[rows, :, book.write] = value_states.transpose(1, 2)
        return self._keys[: book.rows, :, : book.span], self._values[: book.rows, :, : book.span]

    def _reserve(self, like: torch.Tensor, rows: int, length: int) -> None:
        if self._keys is not None and rows <= self._keys.shape[0] and length <= self._keys.shape[2]:
            return
        old = self._keys.shape if self._keys is not None else (0, like.shape[1], 0, like.shape[-1])
        shape = (_grow(old[0], rows), like.shape[1], _grow(old[2], length), like.shape[-1])
        for name in ("_keys", "_values"):
            # Zeros, not empty memory: masked slots still go through the matmuls, and 0 * NaN garbage is NaN.
            buffer = like.new_zeros(shape)
            if getattr(self, name) is not None:
                buffer[: old[0], :, : old[2]] = getattr(self, name)
            setattr(self, name, buffer)

    def suffix(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's first `length` suffix K/V as fresh [1, kv_heads, length, D] tensors."""
        return self._keys[slot : slot + 1, :, :length].clone(), self._values[slot : slot + 1, :, :length].clone()

    def copy_slot(self, source: "RowsLayer", source_slot: int, slot: int, length: int) -> None:
        if length == 0:
            return
        self._reserve(source._keys, slot + 1, length)
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

    def __init__(self, config, device):
        super().__init__(config=config)
        self.book = RowsBook(device)
        layers = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, LinearAttentionLayer):
                linear = RowsLinearLayer.__new__(RowsLinearLayer)
                linear.__dict__.update(layer.__dict__)
                layers.append(linear)
            else:
                layers.append(RowsLayer(self.book, i))
        self.layers = layers
        self._linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> slot buffers (conv, recurrent)
        self.linear_fresh = True  # no row has a linear state yet (text-only rows before their first forward)

    @property
    def rows(self) -> int:
        return self.book.rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.book.longest()

    # -- rows in and out ---------------------------------------------------------------------------------------

    def add(self, prefix: Prefix) -> int:
        """A new row starting from `prefix` (its suffix empty); returns its slot."""
        slot = self.rows
        self.book.prefixes.append(prefix)
        self.book.lengths.append(0)
        self.book._reserve(slot + 1, 0)
        self.book.keys[slot] = -1
        for i, (a, b) in enumerate(prefix.kv):
            if isinstance(self.layers[i], RowsLinearLayer) and a is not None:
                self._set_linear(i, slot, a[0], b[0])
                self.linear_fresh = False
        self._bind()
        return slot

    def adopt(self, other: "RowsCache", other_slot: int) -> int:
        """Move a row from another cache (where it was prefilled) into this one; returns its new slot."""
        prefix, length = other.book.prefixes[other_slot], other.book.lengths[other_slot]
        slot = self.rows
        self.book.prefixes.append(prefix)
        self.book.lengths.append(length)
        self.book._reserve(slot + 1, max(length, 1))
        self.book.keys[slot] = -1
        self.book.keys[slot, :length] = other.book.keys[other_slot, :length]
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RowsLayer):
                layer.copy_slot(other.layers[i], other_slot, slot, length)
            else:
                conv, recurrent = other.layers[i].conv_states[0], other.layers[i].recurrent_states[0]
                self._set_linear(i, slot, conv[other_slot], recurrent[other_slot])
        self._bind()
        return slot

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
                elif i in self._linear:
                    for buffer in self._linear[i]:
                        buffer[slot] = buffer[last]
        book.lengths.pop()
        book.prefixes.pop()
        self._bind()

    def suffix_kv(self, slot: int, length: int) -> list:
        """A row's first `length` suffix K/V per attention layer ([1, kv_heads, length, D])."""
        return [layer.suffix(slot, length) if isinstance(layer, RowsLayer) else (None, None) for layer in self.layers]

    def _set_linear(self, i: int, slot: int, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        buffers = self._linear.get(i)
        if buffers is None or slot >= buffers[0].shape[0]:
            size = max(slot + 1, 2 * buffers[0].shape[0] if buffers else 4)
            grown = (conv.new_zeros((size, *conv.shape)), recurrent.new_zeros((size, *recurrent.shape)))
            if buffers is not None:
                grown[0][: buffers[0].shape[0]] = buffers[0]
                grown[1][: buffers[1].shape[0]] = buffers[1]
            self._linear[i] = buffers = grown
        buffers[0][slot].copy_(conv)
        buffers[1][slot].copy_(recurrent)

    def _bind(self) -> None:
        for i, (conv, recurrent) in self._linear.items():
            self.layers[i].bind(conv, recurrent, self.rows)

    # -- attention ---------------------------------------------------------------------------------------------

    def attend(self, layer_idx: int, query, key, value, scaling, window):
        """query [B, Hq, L, D], key/value [B, Hkv, S, D] (the rows' suffixes) -> [B, L, Hq, D]."""
        book = self.book
        batch, q_heads, length, dim = query.shape
        kv_heads, span = key.shape[1], key.shape[2]
        groups = q_heads // kv_heads
        scale = scaling if scaling is not None else dim**-0.5
        q = query.reshape(batch, kv_heads, groups * length, dim)
        suffix = torch.matmul(q, key.transpose(-1, -2)).float() * scale + _suffix_bias(book, span, groups, window)
        suffix_probs = torch.empty(suffix.shape, dtype=value.dtype, device=value.device)
        out = torch.zeros(batch, kv_heads, groups * length, dim, dtype=value.dtype, device=value.device)
        for group in book.groups:
            rows = group.rows
            pk, pv = group.prefix.kv[layer_idx]
            stored = pk.shape[-2] if pk is not None else 0
            if stored == 0:
                suffix_probs[rows] = torch.softmax(suffix[rows], dim=-1).to(value.dtype)
                continue
            # 1. This prefix against its rows' queries, all in one matmul.
            qg = q[rows]
            n = qg.shape[0]
            q_rows = qg.transpose(0, 1).reshape(kv_heads, n * groups * length, dim)
            scores = torch.matmul(q_rows, pk[0].transpose(-1, -2)).view(kv_heads, n, groups * length, stored).transpose(0, 1)
            scores = scores.float() * scale
            if window is not None:
                scores = scores + _prefix_bias(book, rows, group.prefix.tokens - stored, stored, groups, window)
            # 2. One softmax over prefix and suffix; the prefix's share of the output.
            probs = torch.softmax(torch.cat([scores, suffix[rows]], dim=-1), dim=-1).to(value.dtype)
            suffix_probs[rows] = probs[..., stored:]
            p_rows = probs[..., :stored].transpose(0, 1).reshape(kv_heads, n * groups * length, stored)
            out[rows] = torch.matmul(p_rows, pv[0]).view(kv_heads, n, groups * length, dim).transpose(0, 1)
        # 3. Every row's suffix share in one batched matmul.
        out = out + torch.matmul(suffix_probs, value)
        return out.reshape(batch, q_heads, length, dim).transpose(1, 2).contiguous(), None


def _suffix_bias(book: RowsBook, span: int, groups: int, window: int | None) -> torch.Tensor:
    key = ("suffix", span, groups, window)
    if key not in book.masks:
        q, k = book.queries.unsqueeze(-1), book.keys[: book.rows, :span].unsqueeze(1)  # [B, L, 1], [B, 1, S]
        allowed = (k >= 0) & (k <= q)
        if window is not None:
            allowed = allowed & (k > q - window)
        book.masks[key] = _expand(allowed, groups)
    return book.masks[key]


def _prefix_bias(book: RowsBook, rows, offset: int, stored: int, groups: int, window: int) -> torch.Tensor:
    q = book.queries[rows].unsqueeze(-1)  # [n, L, 1]
    k = torch.arange(offset, offset + stored, device=q.device).view(1, 1, -1)
    return _expand((k <= q) & (k > q - window), groups)


def _expand(allowed: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, L, S] allowed -> additive [B, 1, g*L, S] bias (grouped heads folded into the query dimension)."""
    batch, length, span = allowed.shape
    allowed = allowed.unsqueeze(1).expand(batch, groups, length, span).reshape(batch, 1, groups * length, span)
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: RowsCache, logical: torch.Tensor,
            valid: torch.Tensor) -> torch.Tensor:
    """New tokens for every row of `cache` (left-padded; `valid` False for padding); logits of the last [B, V]."""
    cache.book.begin(logical, valid)
    out = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1,
                shared_prefix_cache=cache)
    return out.logits[:, -1, :]
