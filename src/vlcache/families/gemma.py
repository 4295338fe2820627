"""Gemma 3: plain 1D RoPE, 5 of 6 text layers with a sliding window, image tokens that see each other.

- Image tokens attend to each other both ways: the image prefill passes `token_type_ids` (1 on the image's
  soft tokens), from which transformers builds the bidirectional blocks; everything after the image is
  plain causal, so questions pass none.
- A sliding layer keeps only the last window - 1 tokens of a state (all any later token can see); the file
  stores those and the header marks the layer `sliding_attention`. Restored, the layer knows how many tokens
  it does not hold, so positions and windows are those of the whole prefix.
- The chat template writes <bos> itself: the processor must not add another.
"""

from __future__ import annotations

import torch

from .base import Family, OneDimPositions


class Gemma3(OneDimPositions, Family):
    name = "gemma3"
    model_types = ("gemma3",)

    def processor_settings(self, max_pixels: int | None) -> dict:
        ip, proc = self.processor.image_processor, self.processor
        settings = {"max_pixels": max_pixels, "size": dict(ip.size), "image_seq_length": proc.image_seq_length,
                    "image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}
        for name in ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                     "pan_and_scan_min_ratio_to_activate"):
            settings[name] = getattr(ip, name, None)
        return settings

    def prefix_inputs(self, text: str, images: list, videos: list, images_kwargs: dict):
        return self.processor(text=[text], return_tensors="pt", add_special_tokens=False,
                              **self.media_kwargs(images, videos, images_kwargs))

    def image_token_mask(self, inputs) -> torch.Tensor:
        return (inputs["token_type_ids"] == 1).long()

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        from ..generate import forward

        ids = inputs["input_ids"]
        index = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        forward(self.model, ids, index, cache, pixel_values=inputs["pixel_values"].to(dtype),
                token_type_ids=inputs["token_type_ids"])
        return 0
