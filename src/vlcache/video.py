"""Open user videos safely with PyAV (its wheels bundle FFmpeg): probe, sample frames, decode only those.

Which frames are sampled is the model's own video processor's choice (its `sample_frames` with its fps, min
and max frames), overridable by fps and max_frames. The container is probed first, so a frame size or a
decoded size that would not fit is refused before any frame is decoded; then only the sampled frames are
converted to RGB, each downscaled to at most `max_pixels` pixels when given.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import images
from .errors import VideoError
from .images import MAX_DECODE_PIXELS  # noqa: F401 - frames declaring more pixels are refused, as images are

# Files with these suffixes are videos; anything else is opened as an image (a GIF too: its first frame).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv", ".3gp", ".flv",
                            ".wmv", ".ts"})
MAX_VIDEO_BYTES = 1024 * 1024 * 1024  # a video file larger than this is refused before it is read
MAX_DECODED_BYTES = 4 * 1024 * 1024 * 1024  # sampled RGB frames kept in memory at once


@dataclass(frozen=True)
class VideoInfo:
    """What the container says before anything is decoded."""

    width: int
    height: int
    fps: float
    total_frames: int
    duration: float  # seconds


@dataclass(frozen=True)
class LoadedVideo:
    frames: np.ndarray = field(repr=False)  # [T, H, W, 3] uint8, the sampled frames
    indices: list[int]  # which source frames they are
    info: VideoInfo
    sha256: str  # of the encoded bytes
    path: str | None

    @property
    def timestamps(self) -> list[float]:
        """Seconds into the clip of each sampled frame."""
        return [round(i / self.info.fps, 3) for i in self.indices]

    def metadata(self):
        """transformers' VideoMetadata of the sampled frames (the processor takes timestamps from it)."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=self.info.total_frames, fps=self.info.fps, width=self.info.width,
                             height=self.info.height, duration=self.info.duration, video_backend="pyav",
                             frames_indices=list(self.indices))


def is_video_path(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in VIDEO_SUFFIXES


def read_video_bytes(source: str | os.PathLike | bytes) -> tuple[bytes, str | None]:
    """The encoded bytes of a video file (or bytes as given), and its path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise VideoError("the video bytes are empty")
        return data, None
    return images.read_file(Path(source), "video", MAX_VIDEO_BYTES, VideoError), str(source)


def probe(data: bytes, name: str, max_decode_pixels: int) -> VideoInfo:
    """Frame size, rate, count and duration from the container; VideoError for anything that is not a
    decodable video with at least one frame of an acceptable size."""
    with _open(data, name) as container:
        if container.format.name.endswith("_pipe") or container.format.name == "image2":
            raise VideoError(f"not a video: {name} is a still image ({container.format.name.removesuffix('_pipe')}); "
                             "a file is taken as a video by its suffix (.mp4, .webm, .mov, ...): give it an image's "
                             "suffix (.jpg, .png, ...) on the command line, or send it as an image_url")
        stream = _video_stream(container, name, max_decode_pixels)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(f"video has no frame size: {name}")
        if width * height > max_decode_pixels:
            raise VideoError(f"video frames are too large: {name} is {width}x{height} = {width * height:,} pixels a "
                             f"frame, over the {max_decode_pixels:,}-pixel safety limit; downscale it first")
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        duration = _duration(stream, container)
        total = int(stream.frames or 0)
        if total <= 0 or fps <= 0:  # some containers (WebM, MKV) do not say: count the frames
            total = _count_frames(container, stream, name, max_decode_pixels)
            fps = fps or (total / duration if duration else 24.0)
        if total <= 0:
            raise VideoError(f"video has no frames: {name}")
        return VideoInfo(width=width, height=height, fps=fps, total_frames=total, duration=duration or total / fps)


class DecodeBudget:
    """How much decoding one request may cause: frame pixels in all (every frame decoded counts, sampled or
    not: the decoder runs through all of them up to the last one sampled), and a flag that stops it (the
    client hung up). Set for a thread with `limited`; without one, decoding is bounded only per frame."""

    def __init__(self, pixels: int, cancelled: threading.Event | None = None):
        self.pixels, self.used, self.cancelled = pixels, 0, cancelled

    def spend(self, pixels: int, name: str) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise VideoError(f"decoding {name} was stopped: no one waits for it any more")
        self.used += pixels
        if self.used > self.pixels:
            raise VideoError(f"video needs too much decoding: {name} would decode over {self.pixels:,} frame pixels "
                             "(every frame up to the last sampled one counts); send a shorter or smaller clip")


_budget: contextvars.ContextVar[DecodeBudget | None] = contextvars.ContextVar("vlcache_decode_budget", default=None)


@contextlib.contextmanager
def limited(budget: DecodeBudget):
    """Decoding in this context spends `budget` (a server sets one per request)."""
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def decode(data: bytes, name: str, info: VideoInfo, indices: list[int], max_pixels: int | None,
           max_decode_pixels: int = MAX_DECODE_PIXELS) -> np.ndarray:
    """The frames at `indices` (sorted; an index repeated gives its frame again, as some samplers ask) as RGB,
    downscaled to at most `max_pixels` pixels each.

    Every decoded frame is held to `max_decode_pixels` (a stream may change its frame size midway: FFmpeg
    refuses larger frames before allocating them) and spends the budget of the context (see `limited`),
    which is checked before anything is decoded too."""
    width, height = frame_size(info.width, info.height, max_pixels)
    need = len(indices) * width * height * 3
    if need > MAX_DECODED_BYTES:
        raise VideoError(f"video too large to decode: {len(indices)} frames of {width}x{height} need {need / 2**30:.1f} GiB "
                         f"(limit {MAX_DECODED_BYTES / 2**30:.0f} GiB); pass --max-frames or --max-pixels")
    requested, indices = indices, sorted(set(indices))  # each frame decoded once, handed out as often as asked
    budget = _budget.get()
    # Decoding every frame up to the last sampled one is exact for any stream; where it would cost more than
    # the budget, the decoder seeks to the keyframe before each sampled frame instead (a long clip with regular
    # keyframes then costs a few frames a sample; a clip with none runs out of budget while decoding).
    seek = budget is not None and budget.used + (indices[-1] + 1) * info.width * info.height > budget.pixels
    frames = []
    with _open(data, name) as container:
        stream = _video_stream(container, name, max_decode_pixels)
        try:
            if seek:
                frames = _decode_seeking(container, stream, info, indices, (width, height), name, max_decode_pixels, budget)
            else:
                wanted = set(indices)
                for i, frame in enumerate(container.decode(stream)):
                    _check_frame(frame, name, max_decode_pixels, budget)
                    if i in wanted:
                        frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                    if i >= indices[-1]:
                        break
        except _av_errors() as exc:
            raise VideoError(f"video is truncated or corrupt (or changes to frames over the {max_decode_pixels:,}-pixel "
                             f"limit): {name}: {_reason(exc)} (after {len(frames)} of the {len(indices)} sampled frames)") from None
    if len(frames) < len(indices):
        raise VideoError(f"video is truncated or corrupt: {name}: {len(frames)} of the {len(indices)} sampled frames "
                         f"could be decoded (the container promised {info.total_frames})")
    by_index = dict(zip(indices, frames))
    return np.stack([by_index[i] for i in requested])


SEEK_GAP_SECONDS = 2.0  # a sampled frame this far past the decoder's position is reached by seeking


def _decode_seeking(container, stream, info: VideoInfo, indices: list[int], size: tuple[int, int], name: str,
                    max_decode_pixels: int, budget: DecodeBudget) -> list:
    """The frames at `indices`, seeking to the keyframe before a sampled frame that is far ahead; a frame's index
    is its presentation time times the rate (what sequential counting gives for a constant-rate stream)."""
    if not stream.time_base or info.fps <= 0:
        budget.spend((indices[-1] + 1) * info.width * info.height, name)  # cannot seek: refused as before
    base, frames, at, decoded = stream.start_time or 0, [], -1, None
    for index in indices:
        if decoded is None or index - at > SEEK_GAP_SECONDS * info.fps:
            container.seek(base + int(index / info.fps / stream.time_base), backward=True, any_frame=False, stream=stream)
            decoded = container.decode(stream)
        for frame in decoded:
            _check_frame(frame, name, max_decode_pixels, budget)
            if frame.pts is None:
                continue
            at = round(float((frame.pts - base) * stream.time_base) * info.fps)
            if at >= index:
                frames.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
                break
        else:
            break  # the stream ended first: reported as truncated
    return frames


def frame_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- PyAV ----------------------------------------------------------------------------------------------------

def _av():
    try:
        import av
    except ImportError:  # a dependency; only a broken install lacks it
        raise VideoError("videos need PyAV: pip install av") from None
    return av


def _av_errors() -> tuple[type[BaseException], ...]:
    av = _av()
    return (av.FFmpegError, OSError, ValueError, EOFError)


def _reason(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).splitlines()[0]


class _open:
    """av.open over bytes as a context manager whose failures are VideoErrors."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name

    def __enter__(self):
        av = _av()
        try:
            self.container = av.open(io.BytesIO(self.data), mode="r")
        except _av_errors() as exc:
            raise VideoError(f"not a video (unrecognised or corrupt container): {self.name}: {_reason(exc)}") from None
        return self.container

    def __exit__(self, *exc):
        self.container.close()
        return False


def _video_stream(container, name: str, max_decode_pixels: int = MAX_DECODE_PIXELS):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise VideoError(f"no video stream in {name}" + (f" (it holds only {', '.join(kinds)})" if kinds else ""))
    stream = container.streams.video[0]
    stream.codec_context.options = {"max_pixels": str(max_decode_pixels)}  # FFmpeg refuses larger frames unallocated
    stream.thread_type = "AUTO"
    return stream


def _check_frame(frame, name: str, max_decode_pixels: int, budget: DecodeBudget | None) -> None:
    """A decoded frame within the per-frame limit (the probe saw only the first frame size), and paid for."""
    pixels = frame.width * frame.height
    if pixels > max_decode_pixels:
        raise VideoError(f"video frames are too large: {name} changes to {frame.width}x{frame.height} = {pixels:,} pixels "
                         f"a frame midway, over the {max_decode_pixels:,}-pixel safety limit")
    if budget is not None:
        budget.spend(pixels, name)


def _duration(stream, container) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return 0.0


def _count_frames(container, stream, name: str, max_decode_pixels: int) -> int:
    budget, count = _budget.get(), 0
    try:
        for frame in container.decode(stream):
            _check_frame(frame, name, max_decode_pixels, budget)
            count += 1
    except _av_errors() as exc:
        raise VideoError(f"video is truncated or corrupt (or changes to frames over the {max_decode_pixels:,}-pixel "
                         f"limit): {name}: {_reason(exc)}") from None
    return count
