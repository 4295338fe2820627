"""Mistral 3 (Mistral-Small-3.1 and later): Pixtral vision (the image at its own aspect ratio, one [IMG] token per
merged patch, [IMG_BREAK] after each row, [IMG_END] at the end) into a Mistral text model with plain 1D RoPE.
The processor's `image_sizes` go to the model with the pixels."""

from __future__ import annotations

from .plain import PlainImageText


class Mistral3(PlainImageText):
    name = "mistral3"
    model_types = ("mistral3",)
