"""Images in any mode are converted; missing, broken, foreign and oversized ones are refused with a reason."""

import struct
import zlib

import pytest
from PIL import Image

from conftest import SYSTEM, photo
from reference import reference_tokens
from vlcache import images
from vlcache.errors import ImageError


def _png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims a huge size: decoding it would allocate width*height pixels."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "I;16"])
def test_modes_are_converted_to_rgb(mode, tmp_path):
    source = Image.open(photo("chelsea.png"))
    converted = source.convert(mode if mode != "I;16" else "I").convert(mode) if mode == "I;16" else source.convert(mode)
    path = tmp_path / ("img.tiff" if mode in ("CMYK", "I;16") else "img.png")
    converted.save(path)
    loaded = images.load_image(path)
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == source.size


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert images.load_image(rgba).image.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_its_first_frame(engine, tmp_path):
    frames = [Image.open(photo("coffee.png")).convert("P"), Image.open(photo("rocket.jpg")).resize((600, 400)).convert("P")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = images.load_image(path)
    assert loaded.image.size == (600, 400)
    state = engine.cache_image(path, system_prompt=SYSTEM)
    assert state.metadata.image_tokens > 0


def test_grayscale_photo_answers_like_uncached(engine):
    state = engine.cache_image(photo("camera.png"), system_prompt=SYSTEM)  # mode L on disk
    answer = engine.ask(state, "What is in the picture?", max_new_tokens=12, temperature=0)
    assert answer.token_ids == reference_tokens(engine, photo("camera.png"), SYSTEM, "What is in the picture?", 12)


def test_bytes_and_pil_inputs(engine):
    data = photo("coffee.png").read_bytes()
    from_bytes = engine.cache_image(data, system_prompt=SYSTEM)
    from_path = engine.cache_image(photo("coffee.png"), system_prompt=SYSTEM)
    from_pil = engine.cache_image(Image.open(photo("coffee.png")), system_prompt=SYSTEM)
    assert from_bytes.metadata.image_sha256 == from_path.metadata.image_sha256
    assert from_bytes.metadata.image_path is None
    assert from_pil.num_tokens == from_path.num_tokens


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "not found"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty"),
        (lambda p: (p.write_text("hello, not a picture"), p)[1], "not an image"),
        (lambda p: (p.write_bytes(photo("rocket.jpg").read_bytes()[:3000]), p)[1], "truncated or corrupt"),
        (lambda p: (p.write_bytes(photo("coffee.png").read_bytes()[:5000]), p)[1], "truncated or corrupt"),
        (lambda p: p.parent, "folder"),
        (lambda p: (p.write_bytes(_png_claiming(40_000, 40_000)), p)[1], "decompression bomb"),
    ],
    ids=["missing", "empty", "text", "truncated-jpeg", "truncated-png", "folder", "bomb"],
)
def test_bad_images_are_refused(tmp_path, make, message):
    path = make(tmp_path / "bad.png")
    with pytest.raises(ImageError, match=message):
        images.load_image(path)


def test_image_too_big_for_memory_is_refused_or_downscaled(engine, monkeypatch):
    from vlcache import model as model_loading

    monkeypatch.setattr(model_loading, "available_memory", lambda device: 1024 * 1024)
    with pytest.raises(ImageError, match="--max-pixels"):
        engine.cache_image(photo("hubble_deep_field.jpg"))
    state = engine.cache_image(photo("hubble_deep_field.jpg"), max_pixels=256 * 256)
    assert state.metadata.image_tokens <= 64
    assert state.metadata.max_pixels == 256 * 256


def test_token_estimate_matches_the_processor(engine):
    for name in ("astronaut.png", "hubble_deep_field.jpg", "chelsea.png"):
        with Image.open(photo(name)) as img:
            estimate = engine.image_tokens(*img.size)
        assert estimate == engine.cache_image(photo(name)).metadata.image_tokens
