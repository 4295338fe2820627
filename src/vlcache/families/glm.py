"""GLM-4.1V, GLM-4.5V and GLM-4.6V (glm4v, glm4v_moe, glm46v): Qwen-style M-RoPE from the model's own rope index.

The text model is GLM-4 (MoE in 4.5V) with plain full-attention K/V; positions are [4, B, L] as for Qwen (row 0
the cache slot, rows 1-3 t/h/w), and the delta after the media comes from the model's get_rope_index. What
differs from Qwen is in the processor and the video path:
- a video is one <|begin_of_image|>...<|end_of_image|>{timestamp} block per pair of frames (the processor
  writes the timestamps), its tokens carry the image token id, and mm_token_type_ids marks them 2;
- GLM's frame sampler repeats the last frame when it picked an odd number (frames are encoded in pairs):
  vlcache decodes each frame once and repeats it here, so the frames equal what transformers' loader gives.
"""

from __future__ import annotations

import numpy as np

from .base import Family
from .qwen import QwenMRoPE


class Glm4v(QwenMRoPE):
    name = "glm4v"
    model_types = ("glm4v", "glm4v_moe", "glm46v")

    def image_tokens(self, width: int, height: int, images_kwargs: dict) -> int | None:
        return Family.image_tokens(self, width, height, images_kwargs)  # GLM's own smart_resize, via its processor

    def video_indices(self, info, fps: float | None, max_frames: int | None) -> list[int]:
        """GLM's sampler at video_fps(fps), each frame once (a repeated last frame is restored in media_kwargs);
        `max_frames` keeps that many, evenly spaced."""
        from transformers.video_utils import VideoMetadata

        meta = VideoMetadata(total_num_frames=info.total_frames, fps=info.fps, width=info.width, height=info.height,
                             duration=info.duration)
        indices = sorted({int(i) for i in self.processor.video_processor.sample_frames(meta, fps=self.video_fps(fps))})
        if max_frames is not None and len(indices) > max_frames:
            picks = np.linspace(0, len(indices) - 1, max_frames).round().astype(int)
            indices = sorted({indices[i] for i in picks})
        return indices

    def media_kwargs(self, images: list, videos: list, images_kwargs: dict) -> dict:
        kwargs = super().media_kwargs(images, videos, images_kwargs)
        kwargs.pop("cap_pixels_per_frame", None)
        if videos:
            kwargs["videos"], kwargs["video_metadata"] = zip(*[_paired(v) for v in videos])
            kwargs["videos"], kwargs["video_metadata"] = list(kwargs["videos"]), list(kwargs["video_metadata"])
        return kwargs


def _paired(video):
    """Frames and metadata with the last frame repeated when their count is odd, as GLM's sampler returns them."""
    frames, meta = video.frames, video.metadata()
    if len(frames) % 2:
        frames = np.concatenate([frames, frames[-1:]])
        meta.frames_indices = list(meta.frames_indices) + [meta.frames_indices[-1]]
    return frames, meta
