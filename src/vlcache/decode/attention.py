"""The attention function vlcache installs in the text model: rows of a RowsCache, or plain SDPA.

A forward over a RowsCache (prefill of questions, decode steps) passes it as `vlcache_rows`, and every layer
attends through RowsCache.attend; any other forward (the image prefill, which must equal generate()) takes
transformers' SDPA path unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "vlcache_rows"


def rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, vlcache_rows=None,
                   sliding_window=None, **kwargs):
    """transformers attention interface: query [B, Hq, L, D], key/value [B, Hkv, S, D] -> [B, L, Hq, D]."""
    if vlcache_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    for name in ("softcap", "s_aux"):  # attention features the rows' attention does not compute: refuse, never ignore
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"vlcache's decode path does not compute attention with {name} "
                                      f"({type(module).__name__}); this model cannot be cached exactly")
    return vlcache_rows.attend(query, key, value, scaling, sliding_window, getattr(module, "layer_idx", None)), None


def install(model) -> None:
    """Route the text model's attention through rows_attention (SDPA masks for plain forwards)."""
    AttentionInterface.register(ATTENTION, rows_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.config.get_text_config()._attn_implementation = ATTENTION


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, logical: torch.Tensor,
            counts: list[int], batch: int | None = None, span: int | None = None) -> torch.Tensor:
    """New tokens for the rows of `cache` (left-padded; `counts` real tokens per row); logits of the last [B, V]."""
    cache.begin(logical, counts, batch, span)
    out = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1,
                vlcache_rows=cache)
    return out.logits[:, -1, :]
