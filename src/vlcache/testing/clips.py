"""Video files made on the spot with PyAV, for tests and benchmarks: clips of any length and size, and the
broken ones a server meets (truncated, no frames, audio only, enormous frames)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_clip(path: str | Path, seconds: float = 2.0, fps: int = 8, size: tuple[int, int] = (96, 64),
              codec: str = "libx264", source: str | Path | None = None, faststart: bool = False) -> Path:
    """An H.264 (or `codec`) clip of `size` (width, height): a pan over `source` (a photograph) when given,
    else moving colour bands, so that every frame differs. `faststart`: the MP4 index goes first (a file cut
    short then still opens, and its missing frames show)."""
    import av

    path = Path(path)
    width, height = size
    picture = _picture(source, width, height)
    frames = max(1, round(seconds * fps))
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.roll(picture, shift=i * max(1, width // 50), axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _picture(source, width: int, height: int) -> np.ndarray:
    if source is not None:
        from PIL import Image

        return np.asarray(Image.open(source).convert("RGB").resize((width, height)))
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    return np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                     (x[None, :] + y) % 256], axis=-1).astype(np.uint8)


def make_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An .m4a-style MP4 holding one AAC audio stream and no video."""
    import av

    path = Path(path)
    rate = 44100
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = int(seconds * rate)
        tone = (0.1 * np.sin(np.arange(samples) * 2 * np.pi * 440 / rate)).astype(np.float32)[None, :]
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_huge_frames(path: str | Path, width: int = 10000, height: int = 9000) -> Path:
    """A one-frame QuickTime video whose frame is enormous (PNG-coded, so the file stays small)."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format="mov") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "gray"
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width), np.uint8), format="gray")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(source: str | Path, target: str | Path, keep: float = 0.5) -> Path:
    """The first `keep` of a file's bytes."""
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: int(len(data) * keep)])
    return Path(target)
