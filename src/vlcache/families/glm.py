"""GLM-4.1V, GLM-4.5V and GLM-4.6V (glm4v, glm4v_moe, glm46v): Qwen-style M-RoPE from the model's own rope index.

The text model is GLM-4 (MoE in 4.5V) with plain full-attention K/V; positions are [4, B, L] as for Qwen (row 0
the cache slot, rows 1-3 t/h/w), and the delta after the media comes from the model's get_rope_index. What
differs from Qwen is in the processor and the video path:
- a video is one <|begin_of_image|>...<|end_of_image|>{timestamp} block per pair of frames (the processor
  writes the timestamps), its tokens carry the image token id, and mm_token_type_ids marks them 2;
- the model's forward finds a video's tokens with the image token id too, so one call cannot take images and a
  video (transformers counts the video's tokens as image tokens and refuses); vlcache gives the forward the
  features of every media token of a piece, in token order, as one image output (what the mask covers);
- GLM's frame samplers may pick a frame twice (GLM-4.1V repeats the last of an odd count, since frames are
  encoded in pairs; GLM-4.6V spreads a fixed count over short clips): the indices are kept as sampled, and each
  frame is decoded once and repeated, so the frames equal what transformers' own loader gives.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .base import Family
from .qwen import QwenMRoPE


class Glm4v(QwenMRoPE):
    name = "glm4v"
    model_types = ("glm4v", "glm4v_moe", "glm46v")

    def image_tokens(self, width: int, height: int, images_kwargs: dict) -> int | None:
        return Family.image_tokens(self, width, height, images_kwargs)  # GLM's own smart_resize, via its processor

    def video_indices(self, info, fps: float | None, max_frames: int | None) -> list[int]:
        """GLM's own sampler at video_fps(fps) (GLM-4.6V's chooses its own rate), repeats kept; `max_frames`
        keeps that many of them, evenly spaced."""
        from transformers.video_utils import VideoMetadata

        meta = VideoMetadata(total_num_frames=info.total_frames, fps=info.fps, width=info.width, height=info.height,
                             duration=info.duration)
        indices = sorted(int(i) for i in self.processor.video_processor.sample_frames(meta, fps=self.video_fps(fps)))
        if max_frames is not None and len(indices) > max_frames:
            indices = [indices[i] for i in np.linspace(0, len(indices) - 1, max_frames).round().astype(int)]
        return indices

    def media_kwargs(self, images: list, videos: list, images_kwargs: dict) -> dict:
        kwargs = super().media_kwargs(images, videos, images_kwargs)
        kwargs.pop("cap_pixels_per_frame", None)  # not an argument of GLM's video processor
        return kwargs

    def one_forward_ok(self, inputs) -> bool:
        return inputs.get("pixel_values") is None or inputs.get("pixel_values_videos") is None

    def piece_outputs(self, encoded: dict, types: torch.Tensor, piece: int, end: int) -> dict:
        """Images and videos both in the piece: their features merged in token order as the "image" output,
        since the forward's image mask covers the video's tokens too (its video mask is the same mask)."""
        outputs = super().piece_outputs(encoded, types, piece, end)
        if len(outputs) < 2:
            return outputs
        mine = types[0, piece:end]
        kinds = mine[mine > 0]
        image, video = (torch.cat(outputs[k].pooler_output, dim=0) for k in ("image", "video"))
        merged = image.new_empty((len(kinds), image.shape[-1]))
        merged[kinds == 1], merged[kinds == 2] = image, video
        joined = copy.copy(outputs["image"])
        joined["pooler_output"] = (merged,)
        return {"image": joined}
