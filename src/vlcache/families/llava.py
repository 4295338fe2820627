"""LLaVA-OneVision (llava-hf checkpoints): SigLIP crops (anyres tiling) into a Qwen2 text model, plain 1D RoPE.

Positions are the sequence index; nothing is kept on the model object. An image alone in its conversation
gets anyres tiles (base crop + up to the grid the pinpoints allow, one newline token per row); the tiling
settings are part of a state's identity. `max_pixels` downscales the image before the processor sees it.
"""

from __future__ import annotations

import torch

from .base import Family, OneDimPositions


class LlavaOnevision(OneDimPositions, Family):
    name = "llava-onevision"
    model_types = ("llava_onevision",)

    def processor_settings(self, max_pixels: int | None) -> dict:
        ip, proc = self.processor.image_processor, self.processor
        return {
            "max_pixels": max_pixels, "size": dict(ip.size), "image_grid_pinpoints": [list(p) for p in ip.image_grid_pinpoints],
            "vision_aspect_ratio": proc.vision_aspect_ratio, "num_image_tokens": proc.num_image_tokens,
            "vision_feature_select_strategy": proc.vision_feature_select_strategy,
            "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
        }

    def prefill(self, inputs, cache, dtype: torch.dtype) -> int:
        from ..generate import forward

        ids = inputs["input_ids"]
        index = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        forward(self.model, ids, index, cache, pixel_values=inputs["pixel_values"].to(dtype), image_sizes=inputs["image_sizes"])
        return 0
