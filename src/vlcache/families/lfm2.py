"""LFM2-VL: SigLIP2 NaFlex vision (pixel unshuffle) into an LFM2 text model whose layers are mostly short
convolutions (a causal depthwise conv over the last few tokens) with a few attention layers; plain 1D RoPE.

A short-convolution layer's state is its conv window: the last `conv_L_cache` inputs, [1, hidden, L], the same
size at any length. transformers keeps it in a LinearAttentionLayer that has no recurrent state, and vlcache's
decode path (attention.py, rows.py) expects both. Until it accepts a conv-only layer, this family gives such a
layer an empty recurrent state ([B, 0, 0, 0]) after every forward of the text model, and the layer is kept as a
linear-attention layer: restored, copied per row and snapshotted as Qwen3.5's DeltaNet state is (questions of
unequal length are not padded into it; conversations go back to a turn boundary). The file marks such a layer
`linear_attention`, with the conv window as `conv_state` and the empty `recurrent_state`.
"""

from __future__ import annotations

from transformers.cache_utils import LinearAttentionLayer

from .base import FULL, LINEAR
from .plain import PlainImageText


class Lfm2Vl(PlainImageText):
    name = "lfm2-vl"
    model_types = ("lfm2_vl",)

    def __init__(self, model, processor):
        super().__init__(model, processor)
        text_model = model.model.language_model
        if not getattr(text_model, "_vlcache_conv_hook", False):
            text_model.register_forward_hook(_empty_recurrent_states, with_kwargs=True)
            text_model._vlcache_conv_hook = True

    def layer_kinds(self) -> list[str]:
        return [LINEAR if kind == "conv" else FULL for kind in self.text_config.layer_types]

    def linear_state_shapes(self) -> tuple[tuple, tuple]:
        """A short-convolution layer's window [hidden, L] and the empty recurrent state put beside it."""
        return (self.text_config.hidden_size, self.text_config.conv_L_cache), (0, 0, 0)


def _empty_recurrent_states(module, args, kwargs, output) -> None:
    """After a forward: every conv-only layer that holds a conv window gets an empty recurrent state."""
    cache = kwargs.get("cache")
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, LinearAttentionLayer) and layer.conv_states[0] is not None and layer.recurrent_states[0] is None:
            layer.recurrent_states[0] = layer.conv_states[0].new_zeros(layer.conv_states[0].shape[0], 0, 0, 0)
            layer.is_recurrent_states_initialized[0] = True
