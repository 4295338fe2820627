"""Open user images safely: any common format and mode in, one RGB PIL image out, bombs refused."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

# Above this many pixels an image is refused before it is decoded (Pillow's own bomb threshold is 2x its
# MAX_IMAGE_PIXELS; we refuse at 1x so that a decode never allocates gigabytes on a user's say-so).
MAX_DECODE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # an image file larger than this is refused before it is read


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, first frame of an animation
    sha256: str  # of the encoded bytes: the identity of the image a cache belongs to
    path: str | None  # where it came from, when it came from a file
    width: int
    height: int


def load_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = MAX_DECODE_PIXELS) -> LoadedImage:
    """Open a path, encoded bytes or a PIL image as RGB; raise ImageError with a one-line reason.

    Images that declare more than `max_pixels` are refused before they are decoded.
    """
    if isinstance(source, Image.Image):
        return _from_pil(source, sha256=_pil_sha256(source), path=None)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _from_pil(_decode(data, "the image bytes", max_pixels), sha256=hashlib.sha256(data).hexdigest(), path=None)
    path = Path(source)
    data = _read(path)
    return _from_pil(_decode(data, str(path), max_pixels), sha256=hashlib.sha256(data).hexdigest(), path=str(path))


def _read(path: Path) -> bytes:
    return read_file(path, "image", MAX_IMAGE_BYTES, ImageError)


def read_file(path: Path, what: str, limit: int, error: type[Exception]) -> bytes:
    """The bytes of a user's media file; `error` with a one-line reason if it is missing, not a regular file,
    over `limit` bytes, unreadable or empty."""
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir():
        raise error(f"{what} path is a folder, not a file: {path}")
    if not path.is_file():  # a FIFO would block forever, a device never end
        raise error(f"{what} path is not a regular file: {path}")
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{what} file is too large: {path} is {size:,} bytes, over the {limit:,}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not data:
        raise error(f"{what} file is empty: {path}")
    return data


def _decode(data: bytes, name: str, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"not an image (unrecognised format): {name}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a decompression bomb: {name}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot open image {name}: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"image is too large: {name} is {width}x{height} = {width * height:,} pixels, over the "
            f"{max_pixels:,}-pixel safety limit (possible decompression bomb); downscale it first"
        )
    try:
        img.seek(0)  # animated GIF/PNG/WebP: the first frame
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a decompression bomb: {name}: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"image is truncated or corrupt: {name}: {exc}") from None
    return img


def _from_pil(img: Image.Image, sha256: str, path: str | None) -> LoadedImage:
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        pass
    rgb = to_rgb(img)
    return LoadedImage(image=rgb, sha256=sha256, path=path, width=rgb.width, height=rgb.height)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white, as a viewer shows it; grayscale and palettes expanded."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _pil_sha256(img: Image.Image) -> str:
    digest = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()
