"""Llama 4 (Scout, Maverick): image tiles plus a global view, pixel shuffle, into a MoE text model with chunked
local attention; plain 1D RoPE.

- Chunked local attention: 3 of every 4 layers let a query see a key only inside its own chunk of
  `attention_chunk_size` positions (k // C == q // C, 8192 in the released models); the 4th layer is full
  attention without RoPE (NoPE). A chunked layer's state is the tokens of the prefix's last, unfinished chunk
  (n % C of them; none when n is a multiple of C): no later query sees an earlier key of that layer. The file
  marks such a layer `chunked_attention`; vlcache's decode path masks it by its chunk (decode/rows.py).
- NoPE layers scale their queries by a temperature that grows with the query's position (log1p(floor((p + 1)
  / floor_scale)) * attn_scale + 1). transformers takes p from the cache's length, which in vlcache's batch
  of rows is the slot count shared by all rows, not each row's own position: in a forward over rows, the
  scale is applied to the query projection from each token's own position instead (the same products, bit for
  bit), and transformers' own is switched off for that forward.
- transformers 5.24's Llama4ForConditionalGeneration.forward reads `image_outputs` from its language model's
  output, a MoeCausalLMOutputWithPast that has no such field, so every call (generate's too) raises (5.25 fixed
  it). Whether the loaded transformers has the bug is found by behaviour, not by version: one text-only forward
  of one token when the family is made. Only where that raises for the missing field is the language model's
  output handed on as a class with it (None: the image features are not kept), which is all the top model reads
  from it. tests/test_more_families.py checks answers are exact with and without the bug.
- The image processor rescales and normalizes in bfloat16, as the original code does; the prefill casts the
  pixels to the compute dtype (exactly: bfloat16 values are representable in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .base import CHUNKED, FULL
from .plain import PlainImageText


class Llama4(PlainImageText):
    name = "llama4"
    model_types = ("llama4",)

    def __init__(self, model, processor):
        super().__init__(model, processor)
        _install(model)

    def layer_kinds(self) -> list[str]:
        return [CHUNKED if kind == "chunked_attention" else FULL for kind in self.text_config.layer_types]

    def attention_chunk(self) -> int | None:
        return self.text_config.attention_chunk_size if CHUNKED in self.layer_kinds() else None

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        """The plain prefill; then each chunked layer keeps only the tokens of the last chunk (transformers'
        cache keeps the last C - 1 for it, as for a sliding window of C)."""
        delta = super().prefill(inputs, cache, dtype)
        chunk, n = self.attention_chunk(), inputs["input_ids"].shape[1]
        for layer, kind in zip(cache.layers, self.layer_kinds()):
            if kind == CHUNKED:
                held = layer.keys.shape[-2]
                first = held - n % chunk  # the cache holds the last `held` tokens, the chunk is the last n % C
                layer.keys, layer.values = layer.keys[:, :, first:].clone(), layer.values[:, :, first:].clone()
        return delta


@dataclass
class _TextOutput(MoeCausalLMOutputWithPast):
    """The language model's output with the field Llama4ForConditionalGeneration.forward reads from it."""

    image_outputs: object = None


def _with_image_outputs(module, args, kwargs, output):
    if isinstance(output, MoeCausalLMOutputWithPast) and not isinstance(output, _TextOutput):
        return _TextOutput(**output)
    return output


def _install(model) -> None:
    """Once per model: the output workaround (where this transformers needs it) and per-row temperature scales of
    the NoPE layers."""
    text = model.language_model
    if getattr(text, "_vlcache_llama4", False):
        return
    text._vlcache_output_workaround = needs_output_workaround(model)
    if text._vlcache_output_workaround:
        # prepend: the field must be there before anything else that reads the output sees it.
        text.register_forward_hook(_with_image_outputs, with_kwargs=True, prepend=True)
    for layer in text.model.layers:
        attention = layer.self_attn
        if attention.attn_temperature_tuning and not attention.use_rope:
            attention.forward = _rows_temperature(attention, attention.forward)
            attention.q_proj.register_forward_hook(_scale_queries(attention))
    text._vlcache_llama4 = True


def needs_output_workaround(model) -> bool:
    """Whether the top model's forward fails on its language model's output for want of `image_outputs`: one
    text-only forward of one token. Any other failure is not ours to hide: it propagates."""
    token = model.config.get_text_config().bos_token_id or 0
    ids = torch.tensor([[token]], device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    except AttributeError as error:
        if "image_outputs" in str(error):
            return True
        raise
    return False


def _rows_temperature(attention, forward):
    """The attention's forward; over vlcache's rows, with the temperature from each token's own position."""

    def wrapped(*args, **kwargs):
        rows = kwargs.get("vlcache_rows")
        if rows is None:
            return forward(*args, **kwargs)
        positions = rows.book.queries
        # transformers' formula, on the same float32 values: the same scales bit for bit.
        scales = torch.log1p(torch.floor((positions.float() + 1.0) / attention.floor_scale)) * attention.attn_scale + 1.0
        attention._vlcache_scales = scales.unsqueeze(-1)  # [B, L, 1]
        tuning, attention.attn_temperature_tuning = attention.attn_temperature_tuning, False
        try:
            return forward(*args, **kwargs)
        finally:
            attention.attn_temperature_tuning = tuning
            attention._vlcache_scales = None

    return wrapped


def _scale_queries(attention):
    def hook(module, args, output):
        scales = getattr(attention, "_vlcache_scales", None)
        if scales is None:
            return output
        # NoPE layers apply neither RoPE nor the qk norm, so the projection is what transformers scales.
        return (output * scales).to(output.dtype)

    return hook
