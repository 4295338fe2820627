"""Attention over a shared, read-only prefix: many rows continue from one cached image without copying it.

A SharedPrefixLayer holds the state's K/V once, [1, kv_heads, P, D], and a per-row buffer for what comes
after. The attention function scores every row's queries against the prefix in one matmul (rows folded into
the query dimension, grouped-query heads folded the same way, so K/V are never repeated) and against the
row's own suffix, then takes one softmax over both. It follows transformers' eager attention numerically:
matmuls in the model dtype, softmax in float32.

Which keys a query sees is decided here, from logical positions (a row's unpadded sequence index), not from
cache slots: a `PositionBook` on the cache records each suffix slot's logical position (-1 for padding) and
the current queries'. So padding between the prefix and a short question, and sliding windows (a layer
that stores only the last window - 1 prefix tokens), give each row exactly what it would compute alone.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "vlcache_shared_prefix"


class PositionBook:
    """Logical positions of a shared-prefix cache's suffix slots per row (-1: padding), and of the queries."""

    def __init__(self, batch: int, capacity: int, device):
        self._keys = torch.full((batch, max(capacity, 1)), -1, dtype=torch.long, device=device)
        self.length = 0
        self.queries: torch.Tensor | None = None  # [B, L] of the forward in progress
        self.masks: dict = {}  # this forward's attention biases, shared by the layers that ask for the same one

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, : self.length]

    def append(self, logical: torch.Tensor, valid: torch.Tensor) -> None:
        """`logical` [B, L] positions of new tokens; `valid` [B, L] False for padding (never attended to)."""
        end = self.length + logical.shape[1]
        if end > self._keys.shape[1]:
            grown = self._keys.new_full((self._keys.shape[0], max(end, 2 * self._keys.shape[1])), -1)
            grown[:, : self.length] = self.keys
            self._keys = grown
        self._keys[:, self.length : end] = torch.where(valid, logical, torch.full_like(logical, -1))
        self.length = end
        self.queries = logical
        self.masks = {}

    def truncate(self, length: int) -> None:
        self.length = length
        self.masks = {}


class SharedPrefixLayer(DynamicLayer):
    """`keys`/`values` are the per-row suffix (views of a growable buffer); the prefix sits beside them.

    `offset` counts prefix tokens the layer does not store: a sliding-window layer keeps only the last
    window - 1 of them, which is all any later token can see.
    """

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, batch: int, capacity: int, offset: int = 0):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values  # never written
        self.offset = offset
        shape = (batch, prefix_keys.shape[1], max(capacity, 1), prefix_keys.shape[-1])
        self._key_buffer = prefix_keys.new_empty(shape)
        self._value_buffer = prefix_values.new_empty(shape)
        self.lazy_initialization(prefix_keys, prefix_values)
        self._view(0)

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.offset + self.prefix_length + self.keys.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._grow(end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._view(end)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (prefix included) and forget the rest."""
        if length < self.offset + self.prefix_length:
            raise ValueError("cannot cut into the shared prefix")
        self._view(length - self.offset - self.prefix_length)

    def full(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix and one row's suffix as contiguous [1, kv_heads, n, D] tensors (for saving a conversation)."""
        return (
            torch.cat([self.prefix_keys, self.keys[row : row + 1]], dim=-2),
            torch.cat([self.prefix_values, self.values[row : row + 1]], dim=-2),
        )

    def _view(self, length: int) -> None:
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._key_buffer.shape[-2])
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:2] + (size, old.shape[-1]))
            new[:, :, : old.shape[-2]] = old
            setattr(self, name, new)


def shared_prefix_cache(config, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int = 1, capacity: int = 0,
                        prefix_tokens: int | None = None) -> DynamicCache:
    """A cache over the state's K/V (shared by `batch` rows, never copied) with room for `capacity` more tokens.

    `prefix_tokens` is the state's length; layers that store fewer (sliding windows) hold its last tokens.
    Linear-attention layers get their (conv, recurrent) state copied per row: it is small, and updated in place.
    """
    cache = DynamicCache(config=config)
    linear = [isinstance(layer, LinearAttentionLayer) for layer in cache.layers]
    attention_kv = [k for (k, _), is_linear in zip(kv, linear) if not is_linear]
    total = max(k.shape[-2] for k in attention_kv) if prefix_tokens is None else prefix_tokens
    layers = []
    for (a, b), layer, is_linear in zip(kv, cache.layers, linear):
        if is_linear:
            restore_linear(layer, a, b, batch)
            layers.append(layer)
        else:
            layers.append(SharedPrefixLayer(a, b, batch, capacity, offset=total - a.shape[-2]))
    cache.layers = layers
    cache.book = PositionBook(batch, capacity, attention_kv[0].device)
    return cache


def restore_linear(layer: LinearAttentionLayer, conv: torch.Tensor | None, recurrent: torch.Tensor | None, rows: int) -> None:
    """Put a saved (batch 1) linear-attention state into `layer` for `rows` rows; None leaves the layer fresh."""
    if conv is None:
        return
    conv, recurrent = conv.expand(rows, *conv.shape[1:]), recurrent.expand(rows, *recurrent.shape[1:])
    layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent)
    layer.conv_states[0].copy_(conv)  # copies: the layer updates its state in place
    layer.recurrent_states[0].copy_(recurrent)
    layer.has_previous_state[0] = True  # without it the layer silently starts from an empty state


def linear_state(layer: LinearAttentionLayer, row: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One row's (conv, recurrent) state, as fresh tensors (the layer keeps updating its own)."""
    if not layer.has_previous_state[0]:
        return None, None
    return layer.conv_states[0][row : row + 1].clone(), layer.recurrent_states[0][row : row + 1].clone()


def linear_states(cache: DynamicCache) -> list:
    """Row 0's (conv, recurrent) state of every linear-attention layer, as fresh tensors (a snapshot)."""
    return [linear_state(layer) for layer in cache.layers if isinstance(layer, LinearAttentionLayer)]


def restore(cache: DynamicCache, length: int, states: list) -> None:
    """Back to a snapshot: attention layers cut to `length` tokens, linear layers given `states` (row 0)."""
    first = attention_layer(cache)
    linear = iter(states)
    for layer in cache.layers:
        if isinstance(layer, SharedPrefixLayer):
            layer.truncate(length)
        elif isinstance(layer, LinearAttentionLayer):
            restore_linear(layer, *next(linear), rows=1)
    cache.book.truncate(length - first.offset - first.prefix_length)


def attention_layer(cache: DynamicCache) -> SharedPrefixLayer | None:
    """The first shared-prefix (attention) layer: what says how long the cache is and whether it has a prefix."""
    return next((layer for layer in cache.layers if isinstance(layer, SharedPrefixLayer)), None)


def truncate(cache: DynamicCache, length: int) -> None:
    """Cut a shared-prefix cache back to its first `length` tokens (prefix included).

    Linear-attention states cannot be cut back: a cache holding them only "truncates" to its own length
    (callers restore a snapshot instead, see Conversation).
    """
    first = attention_layer(cache)
    if first is None:
        return
    if any(isinstance(layer, LinearAttentionLayer) for layer in cache.layers) and length != first.get_seq_length():
        raise ValueError("a linear-attention state cannot be cut back; restore a snapshot")
    for layer in cache.layers:
        if isinstance(layer, SharedPrefixLayer):
            layer.truncate(length)
    book = getattr(cache, "book", None)
    if book is not None:
        book.truncate(length - first.offset - first.prefix_length)


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix_cache=None, sliding_window=None, **kwargs):
    """transformers attention interface: query [B, Hq, L, D], key/value [B, Hkv, S, D] -> [B, L, Hq, D]."""
    if shared_prefix_cache is None:  # a plain forward (the image prefill): the usual SDPA path
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    attend = getattr(shared_prefix_cache, "attend", None)
    if attend is not None:  # rows with their own prefixes (vlcache.rows: continuous batching)
        return attend(module.layer_idx, query, key, value, scaling, sliding_window)
    layer = shared_prefix_cache.layers[module.layer_idx]
    pk, pv = layer.prefix_keys[0], layer.prefix_values[0]  # [Hkv, P, D]
    batch, q_heads, length, dim = query.shape
    kv_heads, prefix, suffix = key.shape[1], pk.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # 1. Scores against the prefix (all rows and grouped heads in one matmul) and against each row's suffix.
    q = query.reshape(batch, kv_heads, groups * length, dim)
    q_rows = q.transpose(0, 1).reshape(kv_heads, batch * groups * length, dim)
    prefix_scores = torch.matmul(q_rows, pk.transpose(-1, -2)).view(kv_heads, batch, groups * length, prefix).transpose(0, 1)
    suffix_scores = torch.matmul(q, key.transpose(-1, -2))
    scores = torch.cat([prefix_scores, suffix_scores], dim=-1).float() * scale  # [B, Hkv, g*L, P+S]
    # 2. Mask from logical positions: padding, causality and the layer's sliding window.
    book = shared_prefix_cache.book
    scores = scores + _bias(book, layer.offset, prefix, suffix, groups, sliding_window)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    # 3. Weighted values, prefix part again in one matmul.
    p_rows = probs[..., :prefix].transpose(0, 1).reshape(kv_heads, batch * groups * length, prefix)
    out = torch.matmul(p_rows, pv).view(kv_heads, batch, groups * length, dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., prefix:], value)
    return out.reshape(batch, q_heads, length, dim).transpose(1, 2).contiguous(), None


def _bias(book: PositionBook, offset: int, prefix: int, suffix: int, groups: int, window: int | None) -> torch.Tensor:
    """Additive float mask [B, 1, g*L, P+S]: 0 where a query may look, -inf where not (built once a forward)."""
    key = (offset, prefix, suffix, groups, window)
    if key not in book.masks:
        book.masks[key] = _build_bias(book, offset, prefix, suffix, groups, window)
    return book.masks[key]


def _build_bias(book: PositionBook, offset: int, prefix: int, suffix: int, groups: int, window: int | None) -> torch.Tensor:
    queries = book.queries  # [B, L]
    batch, length = queries.shape
    prefix_pos = torch.arange(offset, offset + prefix, device=queries.device).expand(batch, prefix)
    keys = torch.cat([prefix_pos, book.keys[:, -suffix:] if suffix else book.keys[:, :0]], dim=1)  # [B, P+S]
    q, k = queries.unsqueeze(-1), keys.unsqueeze(1)  # [B, L, 1], [B, 1, P+S]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed.unsqueeze(1).expand(batch, groups, length, prefix + suffix).reshape(batch, 1, groups * length, prefix + suffix)
    return torch.zeros(allowed.shape, device=queries.device).masked_fill(~allowed, float("-inf"))


def install(model) -> None:
    """Route the text model's attention through shared_prefix_attention (falls back to SDPA when unused)."""
    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.config.get_text_config()._attn_implementation = ATTENTION
