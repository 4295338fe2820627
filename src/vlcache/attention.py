"""Attention over a shared, read-only prefix: many rows continue from one cached image without copying it.

A SharedPrefixLayer holds the state's K/V once, [1, kv_heads, P, D], and a per-row buffer for what comes
after. The attention function scores every row's queries against the prefix in one matmul (rows folded into
the query dimension, grouped-query heads folded the same way, so K/V are never repeated) and against the
row's own suffix, then takes one softmax over both. It follows transformers' eager attention numerically:
matmuls in the model dtype, softmax in float32.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "vlcache_shared_prefix"


class SharedPrefixLayer(DynamicLayer):
    """`keys`/`values` are the per-row suffix (views of a growable buffer); the prefix sits beside them."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, batch: int, capacity: int):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values  # never written
        shape = (batch, prefix_keys.shape[1], max(capacity, 1), prefix_keys.shape[-1])
        self._key_buffer = prefix_keys.new_empty(shape)
        self._value_buffer = prefix_values.new_empty(shape)
        self.lazy_initialization(prefix_keys, prefix_values)
        self._view(0)

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prefix_length + self.keys.shape[-2]

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
        if length < self.prefix_length:
            raise ValueError("cannot cut into the shared prefix")
        self._view(length - self.prefix_length)

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


def shared_prefix_cache(config, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int = 1, capacity: int = 0) -> DynamicCache:
    """A cache over the state's K/V (shared by `batch` rows, never copied) with room for `capacity` more tokens."""
    cache = DynamicCache(config=config)
    cache.layers = [SharedPrefixLayer(k, v, batch, capacity) for k, v in kv]
    return cache


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix_cache=None, **kwargs):
    """transformers attention interface: query [B, Hq, L, D], key/value [B, Hkv, S, D] -> [B, L, Hq, D]."""
    if shared_prefix_cache is None:  # a plain forward (the image prefill): the usual SDPA path
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
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
    # 2. Mask: padding and causality as transformers built it, or plain causality within the suffix.
    scores = scores + _bias(attention_mask, batch, groups, length, prefix, suffix, scores.device)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    # 3. Weighted values, prefix part again in one matmul.
    p_rows = probs[..., :prefix].transpose(0, 1).reshape(kv_heads, batch * groups * length, prefix)
    out = torch.matmul(p_rows, pv).view(kv_heads, batch, groups * length, dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., prefix:], value)
    return out.reshape(batch, q_heads, length, dim).transpose(1, 2).contiguous(), None


def _bias(mask, batch, groups, length, prefix, suffix, device) -> torch.Tensor:
    """Additive float mask [B or 1, 1, g*L, P+S]: 0 where a query may look, -inf where not."""
    total = prefix + suffix
    if mask is None:
        if length == 1:
            return torch.zeros((), device=device)
        query_pos = torch.arange(length, device=device).view(-1, 1) + (total - length)
        allowed = torch.arange(total, device=device).view(1, -1) <= query_pos  # [L, P+S]
        allowed = allowed.view(1, 1, 1, length, total)
    else:
        mask = mask[..., -total:]
        allowed = mask if mask.dtype == torch.bool else mask == 0
        allowed = allowed.unsqueeze(2)  # [B, 1, 1, L, P+S]
    allowed = allowed.expand(allowed.shape[0], 1, groups, length, total).reshape(allowed.shape[0], 1, groups * length, total)
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))


def install(model) -> None:
    """Route the text model's attention through shared_prefix_attention (falls back to SDPA when unused)."""
    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.config.get_text_config()._attn_implementation = ATTENTION
