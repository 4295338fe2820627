"""Plain 1D RoPE over a causal text model with full-attention K/V, the vision inputs as the processor makes them.

The base of the families whose processor does its own tiling, pixel shuffle or patch layout (InternVL,
SmolVLM/Idefics3, Mistral 3) and of the generic adapter that vlcache uses for an unlisted image-text model once
`vlcache check` has passed for its weights. The image prefill makes the call generate() makes: every tensor
the processor returned besides ids and mask (pixels in the compute dtype, pixel masks, image sizes, patch
counts) goes to the model with explicit positions 0..n-1.
"""

from __future__ import annotations

import inspect
import json

import torch

from .base import SLIDING, Family, OneDimPositions

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Processor attributes (beyond its image processor's settings) that decide how many tokens an image becomes.
_PROCESSOR_SETTINGS = ("image_seq_length", "image_seq_len", "num_image_tokens", "patch_size", "spatial_merge_size",
                       "vision_feature_select_strategy", "vision_aspect_ratio")


class PlainImageText(OneDimPositions, Family):
    name = "generic"
    model_types: tuple[str, ...] = ()

    @classmethod
    def refuse(cls, config) -> str | None:
        """A text model that reads the image through cross-attention layers (mllama: Llama 3.2 Vision) has no
        image tokens in its sequence: what follows the image is not a continuation of a K/V prefix."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "cross_attention_layers", None) or getattr(config, "cross_attention_layers", None):
            return f"cross-attention to the image ({config.model_type}) is not a prefix state"
        return None

    def layer_kinds(self) -> list[str]:
        """The config's layer types; without them, a `sliding_window` makes every layer sliding (as transformers'
        cache builds it for Mistral-style configs)."""
        if getattr(self.text_config, "layer_types", None) is None and getattr(self.text_config, "sliding_window", None):
            return [SLIDING] * self.text_config.num_hidden_layers
        return super().layer_kinds()

    def processor_settings(self, max_pixels: int | None) -> dict:
        settings = {"max_pixels": max_pixels, "image_processor": _json(self.processor.image_processor)}
        for name in _PROCESSOR_SETTINGS:
            value = getattr(self.processor, name, None)
            if isinstance(value, (int, float, str)):
                settings[name] = value
        return settings

    def prefix_inputs(self, text: str, images: list, videos: list, images_kwargs: dict):
        # As the processor's apply_chat_template: a template that writes <bos> itself gets no second one.
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        return self.processor(text=[text], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)),
                              **self.media_kwargs(images, videos, images_kwargs))

    def encode_after(self, before: str, text: str) -> torch.Tensor:
        """As the processor tokenizes the whole conversation: a processor may rewrite the text around its media
        placeholders before tokenizing (Idefics2's puts a space after the image's closing token: ` What`, not
        `What`), so `before` + `text` and `before` go through the processor's own text path (no media: the
        placeholders expand, or stay, alike in both) and the ids after the covered ones are the question's.
        Where the processor cannot run without media, or the covered ids do not lead, the tokenizer's in-context
        ids are used; `vlcache check` compares the result with the processor's ids for the whole conversation."""
        try:
            head, whole = self._processor_ids(before), self._processor_ids(before + text)
        except Exception:  # noqa: BLE001 - a processor that needs the media to expand its placeholders
            return super().encode_after(before, text)
        if whole[: len(head)] != head:
            return super().encode_after(before, text)
        return torch.tensor([whole[len(head):]], dtype=torch.long)

    def _processor_ids(self, text: str) -> list[int]:
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        ids = self.processor(text=[text], add_special_tokens=not (bos and text.startswith(bos)))["input_ids"][0]
        return [int(i) for i in ids]

    def image_token_mask(self, inputs) -> torch.Tensor:
        return (inputs["input_ids"] == self.image_token_id()).long()

    def image_token_id(self) -> int:
        for owner, name in ((self.config, "image_token_id"), (self.config, "image_token_index"), (self.processor, "image_token_id")):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
        raise ValueError(f"{self.config.model_type}: no image token id in the config or the processor")

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        from ..generate import forward

        ids = inputs["input_ids"]
        index = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        forward(self.model, ids, index, cache, **vision_inputs(inputs, dtype, self.model))
        return 0


# What a processor returns that is a training target, not an input (PaliGemma's returns `labels` with every
# prompt: passed on, the forward computes a loss against the wrong length).
_TARGETS = ("labels",)


def vision_inputs(inputs, dtype: torch.dtype, model=None) -> dict:
    """Every tensor the processor returned besides the text's that `model`'s forward takes by name, floating ones
    (pixels) in the compute dtype."""
    takes = _named_inputs(model) if model is not None else None
    out = {}
    for name, value in inputs.items():
        if name in _TEXT_INPUTS or name in _TARGETS or not torch.is_tensor(value):
            continue
        if takes is not None and name not in takes:
            continue  # a forward's **kwargs go to attention and losses, not to the vision tower
        out[name] = value.to(dtype) if value.is_floating_point() else value
    return out


def _named_inputs(model) -> set[str] | None:
    """The parameters a model's forward names (None where it cannot be read)."""
    try:
        return {name for name, p in inspect.signature(model.forward).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    except (TypeError, ValueError):
        return None


def _json(obj) -> dict:
    """A processor's settings as plain JSON data (what its own to_json_string writes)."""
    try:
        return json.loads(obj.to_json_string())
    except (AttributeError, TypeError, ValueError):
        return {}
