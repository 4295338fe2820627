"""PaddleOCR-VL: a NaViT-style vision encoder into an ERNIE-4.5 text model with Qwen-style 3D M-RoPE.

Positions and the image prefill are Qwen's (the model's own get_rope_index, [4, B, L] position ids, encoder
outputs handed to the pieces of a chunked prefill); images only (transformers' processor takes no video).
"""

from __future__ import annotations

from .base import Family
from .qwen import QwenMRoPE


class PaddleOcrVl(QwenMRoPE):
    name = "paddleocr-vl"
    model_types = ("paddleocr_vl",)
    takes_video = False

    def processor_settings(self, max_pixels: int | None) -> dict:
        ip = self.processor.image_processor
        size = self.images_kwargs(max_pixels).get("size") or dict(ip.size)
        return {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge"),
                "patch_size": ip.patch_size, "merge_size": ip.merge_size,
                "image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}

    def image_tokens(self, width: int, height: int, images_kwargs: dict) -> int | None:
        return Family.image_tokens(self, width, height, images_kwargs)
