"""InternVL 3 / 3.5 (transformers' internvl): dynamic tiling into 448-pixel crops, pixel shuffle to 256 tokens a
crop, a Qwen2/Qwen3 text model with plain 1D RoPE. Each image is <img> + crops x tokens + </img>; the crop
count (min/max patches, the thumbnail) is decided by the image processor and is part of a state's identity.
A video is "Frame1: <img>...</img>\nFrame2: ..." with one crop a frame, its frames chosen by the model's video
processor."""

from __future__ import annotations

from .plain import PlainImageText


class InternVL(PlainImageText):
    name = "internvl"
    model_types = ("internvl",)
    takes_video = True
