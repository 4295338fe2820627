"""The cache file: round trip, size, dtype, atomic writes, and refusal of anything that is not ours."""

import json
from dataclasses import replace
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import SYSTEM, photo
from vlcache import state as state_module
from vlcache.errors import CacheFileError
from vlcache.state import FORMAT_VERSION, read_header, read_metadata

N = 16


def test_round_trip_keeps_tensors_metadata_and_answers(engine, astronaut_state, tmp_path):
    path = astronaut_state.save(tmp_path / "astronaut_cache.pt")  # the guide's .pt name
    loaded = engine.load_state(path)
    assert loaded.metadata == astronaut_state.metadata
    for (k0, v0), (k1, v1) in zip(astronaut_state.kv, loaded.kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "rope_deltas"):
        assert torch.equal(getattr(astronaut_state, name), getattr(loaded, name)), name
        assert getattr(loaded, name).dtype == torch.long
    question = "What colors dominate the scene?"
    assert engine.ask(loaded, question, max_new_tokens=N, temperature=0).token_ids == \
        engine.ask(astronaut_state, question, max_new_tokens=N, temperature=0).token_ids


def test_metadata_records_what_the_issue_lists(astronaut_state, tmp_path):
    path = astronaut_state.save(tmp_path / "a.safetensors")
    meta = read_metadata(path)
    assert meta.model and len(meta.fingerprint) == 32
    assert meta.dtype == "float32"
    assert meta.system_prompt == SYSTEM
    assert meta.image_path == str(photo("astronaut.png").resolve())
    assert meta.image_size == [512, 512]
    assert meta.image_tokens == 256  # 512x512 at 32x32 pixels a token
    assert meta.prefix_tokens == astronaut_state.num_tokens
    assert set(meta.versions) == {"vlcache", "transformers", "torch"}
    assert meta.format_version == FORMAT_VERSION and meta.created


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_stored_in_compute_dtype_and_file_is_lean(tiny_model_dir, tmp_path, dtype):
    from vlcache import Engine

    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    state = engine.cache_image(photo("hubble_deep_field.jpg"))
    path = state.save(tmp_path / "h.pt")
    with safe_open(str(path), "pt") as fh:
        assert fh.get_slice("layers.0.keys").get_dtype() == {"float32": "F32", "bfloat16": "BF16"}[dtype]
    raw_kv = state.kv_bytes
    assert raw_kv == state.num_tokens * engine.kv_bytes_per_token()
    assert path.stat().st_size <= 1.01 * raw_kv + 64 * 1024


def test_save_is_atomic(astronaut_state, tmp_path, monkeypatch):
    target = tmp_path / "cache.pt"
    target.write_bytes(b"previous contents")

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(state_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        astronaut_state.save(target)
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Exploit(marker)))
    zipped = tmp_path / "torch_saved.pt"
    torch.save({"payload": _Exploit(marker)}, zipped)
    for path in (plain, zipped):
        with pytest.raises(CacheFileError, match="never unpickles"):
            state_module.load_state(path)
    assert not marker.exists()


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:30] = b"\xff" * 20
    path.write_bytes(bytes(data))


def _with_version(path: Path, version: int) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = str(version)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.unlink(), "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated"),
        (_corrupt_header, "corrupt"),
        (lambda p: p.write_bytes(b"GIF89a" + bytes(range(256)) * 8), "not a vlcache cache file"),
        (lambda p: save_file({"x": torch.zeros(2)}, str(p)), "without vlcache metadata"),
        (lambda p: _with_version(p, FORMAT_VERSION + 1), "newer than this vlcache reads"),
    ],
    ids=["missing", "empty", "truncated", "tiny", "corrupt-header", "foreign", "plain-safetensors", "newer-format"],
)
def test_bad_cache_files_are_refused_with_a_reason(astronaut_state, tmp_path, damage, message):
    path = astronaut_state.save(tmp_path / "c.pt")
    damage(path)
    with pytest.raises(CacheFileError, match=message):
        state_module.load_state(path)


def test_shapes_that_disagree_with_metadata_are_refused(astronaut_state, tmp_path):
    broken = astronaut_state.to("cpu")
    broken.kv = [(k[:, :, :-1], v[:, :, :-1]) for k, v in broken.kv]
    path = broken.save(tmp_path / "short.pt")
    with pytest.raises(CacheFileError, match="shapes disagree"):
        state_module.load_state(path)


def test_header_reader_checks_size_against_offsets(astronaut_state, tmp_path):
    path = astronaut_state.save(tmp_path / "c.pt")
    header = read_header(path)
    assert header["__metadata__"]["format"] == "vlcache"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CacheFileError, match="size does not match"):
        read_header(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_cache_loads_on_cpu_and_back(tiny_model_dir, tmp_path):
    from vlcache import Engine

    gpu = Engine.load(str(tiny_model_dir), device="cuda", dtype="float32")
    cpu = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")
    path = gpu.cache_image(photo("astronaut.png")).save(tmp_path / "gpu.pt")
    question = "What colors dominate the scene?"
    assert cpu.ask(cpu.load_state(path), question, max_new_tokens=N, temperature=0).text
    back = cpu.cache_image(photo("astronaut.png")).save(tmp_path / "cpu.pt")
    assert gpu.load_state(back).kv[0][0].device.type == "cuda"


def test_a_state_saved_from_any_device_is_plain_cpu_tensors(astronaut_state, tmp_path):
    # The file holds no device: every tensor is written from CPU memory, so a GPU-made cache loads anywhere.
    path = astronaut_state.save(tmp_path / "c.pt")
    assert "device" not in json.loads(read_header(path)["__metadata__"]["metadata"])
    loaded = state_module.load_state(path, device="cpu")
    assert all(k.device.type == "cpu" for k, _ in loaded.kv)


def test_a_header_length_that_starts_like_a_pickle_is_still_read(astronaut_state, tmp_path):
    # safetensors starts with the header length, little-endian: its first byte may well be 0x80.
    path = astronaut_state.save(tmp_path / "c.pt")
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    pad = (0x80 - header_len) % 256
    state = astronaut_state.to("cpu")
    for extra in range(0, 16):  # safetensors aligns the header to 8 bytes: nudge until the low byte is 0x80
        state.metadata = replace(astronaut_state.metadata, system_prompt=SYSTEM + " " * (pad + extra))
        path = state.save(tmp_path / "c.pt")
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_metadata(path).system_prompt.startswith(SYSTEM)
    assert state_module.load_state(path).num_tokens == astronaut_state.num_tokens


def test_a_cut_file_whose_header_length_starts_with_0x80_is_truncated_not_a_pickle(tmp_path):
    """A safetensors header of 0x880 bytes starts with the byte of pickle's PROTO opcode; a pickle has a protocol
    of 2 to 5 after it."""
    path = tmp_path / "c.pt"
    path.write_bytes((0x880).to_bytes(8, "little")[:5])
    with pytest.raises(CacheFileError, match="truncated"):
        state_module.load_state(path)
    path.write_bytes(b"\x80\x04\x95" + bytes(40))
    with pytest.raises(CacheFileError, match="looks like a Python pickle"):
        state_module.load_state(path)
