"""A state's media parts: images and videos in order, opened safely, and what a state file records of each.

Opening goes in two passes so that nothing large is decoded before it is known to fit: images are opened
(their decoders refuse bombs) and videos only probed and their frames chosen; the caller checks the tokens
of all parts against the memory at hand; then the chosen frames of each video are decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import images, video
from .errors import ImageError, VideoError

IMAGE, VIDEO = "image", "video"


@dataclass(frozen=True)
class MediaOptions:
    """How media become tokens besides their content: part of a state's identity."""

    max_pixels: int | None = None  # per image and per video frame (None: the processor's own limits)
    fps: float | None = None  # video frames sampled per second (None: the model's video processor default)
    max_frames: int | None = None  # at most this many frames per video (None: the processor's maximum)

    def check(self) -> None:
        if self.max_pixels is not None and self.max_pixels <= 0:
            raise ImageError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.fps is not None and not 0 < self.fps <= 240:
            raise VideoError(f"fps must be in (0, 240], got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise VideoError(f"max_frames must be at least 1, got {self.max_frames}")


@dataclass
class Part:
    kind: str  # IMAGE or VIDEO
    sha256: str  # of the encoded bytes
    path: str | None
    width: int  # of the image, or of the video's frames as stored
    height: int
    image: object = None  # the PIL image the processor gets (images)
    video: video.LoadedVideo | None = None  # sampled frames and their metadata (videos)
    tokens: int | None = None  # estimated before decoding; None if the family cannot say

    def record(self, grid: list[int] | None) -> dict:
        """What a state file says of this part."""
        out = {"type": self.kind, "sha256": self.sha256, "path": str(Path(self.path).resolve()) if self.path else None,
               "size": [self.width, self.height], "grid": grid}
        if self.video is not None:
            info = self.video.info
            out.update(frames=len(self.video.indices), frame_indices=list(self.video.indices),
                       timestamps=self.video.timestamps, fps=info.fps, total_frames=info.total_frames,
                       duration=round(info.duration, 3), frame_size=[int(self.video.frames.shape[2]), int(self.video.frames.shape[1])])
        return out


def kind_of(source) -> str:
    """VIDEO for paths with a video suffix (.mp4, .webm, .mov, ...), IMAGE otherwise."""
    return VIDEO if video.is_video_path(source) else IMAGE


def load_parts(sources: Sequence, kinds: Sequence[str], family, options: MediaOptions, images_kwargs: dict,
               max_decode_pixels: int, check_tokens: Callable[[list[Part]], None]) -> list[Part]:
    """Open every part; `check_tokens` sees them all (with token estimates) before any video is decoded."""
    options.check()
    parts, pending = [], []
    for source, kind in zip(sources, kinds):
        if kind == IMAGE:
            loaded = images.load_image(source, max_pixels=max_decode_pixels)
            parts.append(Part(IMAGE, loaded.sha256, loaded.path, loaded.width, loaded.height,
                              image=family.prepare_image(loaded.image, options.max_pixels),
                              tokens=family.image_tokens(loaded.width, loaded.height, images_kwargs)))
            continue
        if not family.takes_video:
            raise VideoError(f"this model family ({family.name}) takes no videos in vlcache; families that do: "
                             "Qwen-VL, GLM-4.xV, InternVL, SmolVLM2")
        data, path = video.read_video_bytes(source)
        name = path or "the video bytes"
        info = video.probe(data, name, max_decode_pixels)
        indices = family.video_indices(info, options.fps, options.max_frames)
        width, height = video.frame_size(info.width, info.height, options.max_pixels)
        parts.append(Part(VIDEO, video.sha256(data), path, info.width, info.height,
                          tokens=family.video_tokens(len(indices), width, height)))
        pending.append((len(parts) - 1, data, name, info, indices))
    check_tokens(parts)
    for at, data, name, info, indices in pending:
        frames = video.decode(data, name, info, indices, options.max_pixels, max_decode_pixels)
        parts[at].video = video.LoadedVideo(frames=frames, indices=indices, info=info, sha256=parts[at].sha256, path=parts[at].path)
    return parts

