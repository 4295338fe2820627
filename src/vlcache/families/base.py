"""The one interface every model family implements: prompt inputs, positions, the image prefill, identity.

The engine, the file format, batching, conversations and the server go through a Family and never look at
model_type themselves. A family computes positions explicitly for every forward: nothing is taken from
state kept on the model object (M-RoPE models keep `rope_deltas` there, stale after another image).
"""

from __future__ import annotations

import torch

FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"


class Family:
    name = "base"
    model_types: tuple[str, ...] = ()

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.text_config = model.config.get_text_config()

    # -- identity ------------------------------------------------------------------------------------------------

    def layer_kinds(self) -> list[str]:
        """Per text layer: FULL, SLIDING or LINEAR (what its state is, and so what a file stores for it)."""
        kinds = getattr(self.text_config, "layer_types", None) or [FULL] * self.text_config.num_hidden_layers
        return [kind if kind in (FULL, SLIDING, LINEAR) else FULL for kind in kinds]

    @property
    def has_linear_layers(self) -> bool:
        """Linear-attention layers keep a fixed-size state that cannot be cut back or padded into."""
        return LINEAR in self.layer_kinds()

    def images_kwargs(self, max_pixels: int | None) -> dict:
        """Processor arguments for `max_pixels` (empty: the processor's own settings)."""
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        return {}

    def processor_settings(self, max_pixels: int | None) -> dict:
        """What decides an image's tokens besides its pixels (sizes, tiling, splitting): part of a state's identity."""
        raise NotImplementedError

    def image_tokens(self, width: int, height: int, images_kwargs: dict) -> int | None:
        """How many tokens the image becomes (for the memory check before the vision encoder); None if unknown."""
        try:
            counts = self.processor._get_num_multimodal_tokens(image_sizes=[[height, width]], **images_kwargs)
            return int(counts["num_image_tokens"][0])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            return None

    def prepare_image(self, image, max_pixels: int | None):
        """The image as the processor gets it. Families whose processor has no pixel limit downscale here."""
        return image

    # -- the image prefill -----------------------------------------------------------------------------------

    def prefix_inputs(self, text: str, image, images_kwargs: dict):
        """Tokenized template text with the image expanded into its tokens, and the vision tensors."""
        return self.processor(text=[text], images=[image], return_tensors="pt", images_kwargs=images_kwargs)

    def image_token_mask(self, inputs) -> torch.Tensor:
        """[1, n] long: 1 where a prompt token is an image token."""
        return (inputs["input_ids"] == self.config.image_token_id).long()

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        """Vision encoder and prefill of the prefix into `cache`; returns the position shift after the image."""
        raise NotImplementedError

    def prefill_steps(self, inputs, cache, dtype: torch.dtype, chunk: int | None):
        """prefill() as a generator that yields between units of work of at most `chunk` prefix tokens (so a
        server can decode for others in between) and returns the position shift. Here: one unit; families
        that can run their prefix in pieces override it."""
        return self.prefill(inputs, cache, dtype)
        yield  # noqa: unreachable - makes this a generator

    # -- positions -------------------------------------------------------------------------------------------

    def positions(self, slots: torch.Tensor, logical: torch.Tensor, rope_delta: int) -> torch.Tensor:
        """Position ids for tokens at cache `slots` [B, L] whose unpadded sequence index is `logical` [B, L]."""
        raise NotImplementedError


class OneDimPositions:
    """Plain 1D RoPE: a token's position is its unpadded sequence index; `max_pixels` downscales the image."""

    def positions(self, slots: torch.Tensor, logical: torch.Tensor, rope_delta: int) -> torch.Tensor:
        return logical

    def prepare_image(self, image, max_pixels: int | None):
        if max_pixels is None or image.width * image.height <= max_pixels:
            return image
        from PIL import Image

        scale = (max_pixels / (image.width * image.height)) ** 0.5
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)


def run_steps(steps):
    """Run a generator of units of work (prefill_steps) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
