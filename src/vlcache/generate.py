"""Plain forwards over a DynamicCache: the media prefill, which must equal what generate() computes.

Decoding (questions, answers, conversations, the server) goes through vlcache.decode; this module only runs
the prefix of a state (system prompt, images, videos) with the family's explicit positions. Positions are
always passed explicitly: transformers otherwise derives them from state kept on the model object (M-RoPE's
`rope_deltas`), stale in a fresh process or after another image was served.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, LinearAttentionLayer

# (cache slots [B, L], unpadded sequence index [B, L], rope_delta) -> the model's position_ids
Positions = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def batch_groups(lengths: list[int], can_pad: bool = True) -> list[list[int]]:
    """Row indices that decode together: all of them, or, where rows cannot be padded (linear-attention state
    runs through every input token, padding included), those whose new tokens are equally long."""
    if can_pad:
        return [list(range(len(lengths)))]
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(length, []).append(row)
    return list(groups.values())


def text_positions(positions: Positions, start: int, length: int, rope_delta: int, device) -> torch.Tensor:
    """Positions of `length` unpadded tokens from cache slot `start` on (one row)."""
    index = torch.arange(start, start + length, device=device).unsqueeze(0)
    return positions(index, index, rope_delta)


def cache_from_kv(config, kv: list) -> DynamicCache:
    """A plain cache holding a state's per-layer K/V (or linear states), for a prefill that continues it."""
    cache = DynamicCache(config=config)
    for i, ((a, b), layer) in enumerate(zip(kv, cache.layers)):
        if isinstance(layer, LinearAttentionLayer):
            if a is not None:
                layer.lazy_initialization(conv_states=a, recurrent_states=b)
                layer.conv_states[0].copy_(a)  # copies: the layer updates its state in place
                layer.recurrent_states[0].copy_(b)
                layer.has_previous_state[0] = True  # without it the layer silently starts from an empty state
        elif a is not None and a.shape[-2]:
            layer.update(a.clone(), b.clone())
    return cache


def kv_from_cache(cache: DynamicCache) -> list:
    """Per-layer state of a plain cache: [1, kv_heads, n, D] K/V, or a linear layer's (conv, recurrent); nothing
    for a layer that reads another's K/V (transformers' DummyLayer: Gemma 4's shared layers)."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, DummyLayer):
            out.append((None, None))
        elif isinstance(layer, LinearAttentionLayer):
            if not layer.has_previous_state[0]:
                out.append((None, None))
            else:
                out.append((layer.conv_states[0][:1].clone(), layer.recurrent_states[0][:1].clone()))
        else:
            out.append((layer.keys[:1], layer.values[:1]))
    return out


@torch.inference_mode()
def forward(model, input_ids, position_ids, cache: DynamicCache, **vision) -> torch.Tensor:
    """Run new tokens (one row) through the model, appending to `cache`; the last position's logits [1, V]."""
    mask = torch.ones(input_ids.shape[0], cache.get_seq_length() + input_ids.shape[1], dtype=torch.long,
                      device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                logits_to_keep=1, **vision)
    return out.logits[:, -1, :]
