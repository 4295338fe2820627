"""The header of a vlcache file: format constants, the state's metadata, and reading and checking them.

Nothing here imports torch: a thin client (`--server`) reads a cache file's identity from its header alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .errors import CacheFileError, LayoutError

FORMAT_NAME = "vlcache"
# 2: metadata names the family and each layer's kind (version 1 files read as Qwen-VL)
# 3: metadata lists every image and video part; image_grid_thw holds one row per part with a grid
# 4: metadata may pin the instant a clock-reading chat template was rendered at (template_time); older files read
FORMAT_VERSION = 4
_MAX_HEADER_BYTES = 8 * 1024 * 1024  # real headers are kilobytes; a hostile one must not cost every reader


@dataclass
class StateMetadata:
    model: str
    fingerprint: str
    dtype: str
    system_prompt: str | None
    image_path: str | None
    image_sha256: str
    image_size: list[int]  # [width, height] of the image as given
    max_pixels: int | None
    prefix_tokens: int
    image_tokens: int
    created: str
    # The conversation the KV covers, as the chat template takes it: [system], user(image) for a cached image
    # (its turn open for the question), then any saved exchange. Images appear as {"type": "image"}.
    messages: list = field(default_factory=list)
    processor_settings: dict = field(default_factory=dict)  # what decides the image tokens (pixels, patch, ...)
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    family: str = "qwen-vl"  # vlcache.families: how positions and the image prefill work
    layer_kinds: list = field(default_factory=list)  # per text layer: full_attention, sliding_attention, ...
    # Every image and video in order: type, sha256, path, size, grid; videos also frames sampled, their
    # indices and timestamps, the source fps and duration. Files before version 3: empty (one image, above).
    parts: list = field(default_factory=list)
    reused_tokens: int = 0  # tokens taken from an earlier state when this one was made (not computed again)
    # A chat template that stamps the date or time (strftime_now): the instant its text was rendered at (ISO,
    # local time with offset), which every later question is rendered at too, and the sha256 of the text the
    # state covers (part of its key: the server finds a state by what its template renders now). None otherwise.
    template_time: str | None = None
    template_sha256: str | None = None
    # How the model that computed the K/V held its language model's weights (vlcache.quantize): "none" or "int8".
    # The K/V itself is always in `dtype`; a state is used only by a model quantized the same way.
    quantization: str = "none"


def read_header(path: str | os.PathLike) -> dict:
    """The safetensors header of a vlcache file (a path or an fsspec URL), validated; CacheFileError for anything
    else. Only the header's bytes are read."""
    if storage.is_url(path):
        size = storage.size(str(path))
        head = storage.read_range(str(path), 0, min(8, size))
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES)
        raw = storage.read_range(str(path), 8, 8 + header_len) if ok else b""
        return _check_header(head, raw, size, path)
    path = _cache_path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = fh.read(header_len) if 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES) else b""
    except OSError as exc:
        raise CacheFileError(f"cannot read cache file {path}: {exc.strerror or exc}") from None
    return _check_header(head, raw, size, path)


def _cache_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CacheFileError(f"cache file not found: {path}")
    if path.is_dir():
        raise CacheFileError(f"cache path is a folder, not a file: {path}")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise CacheFileError(f"cache path is not a regular file: {path}")
    return path


def _check_header(head: bytes, raw: bytes, size: int, path) -> dict:
    """Validate a header of any shape a hostile file may give it (lists, ints, deep nesting): a dict, or CacheFileError."""
    header, declared = check_header_bytes(head, raw, size, path)
    if declared != size:
        raise CacheFileError(f"cache file is truncated or corrupt (size does not match its header): {path}")
    return header


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_header_bytes(head: bytes, raw: bytes, size: int, path) -> tuple[dict, int]:
    """The header from a file's first 8 bytes and its JSON, validated as safetensors reads it (every tensor's
    bytes where its dtype and shape say, back to back), and the file size it declares. `size`: the file's
    size, or the most a file may have (an upload whose rest has not arrived). CacheFileError for anything else."""
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = _parse_json(raw) if len(raw) == header_len else None
    if header is None:
        raise CacheFileError(_diagnose_foreign(head, size, path))
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CacheFileError(f"not a vlcache cache file: {path} (a safetensors file without vlcache metadata)")
    version = meta.get("format_version")
    if not isinstance(version, str) or not version.isdigit() or len(version) > 6:
        raise CacheFileError(f"cache file is corrupt (bad format version): {path}")
    if int(version) > FORMAT_VERSION:
        raise CacheFileError(
            f"cache file {path} has format version {version}, newer than this vlcache reads ({FORMAT_VERSION}); "
            "upgrade vlcache or re-create the cache"
        )
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and entry.get("dtype") in _DTYPE_SIZES
                and offsets[1] - offsets[0] == math.prod(shape) * _DTYPE_SIZES[entry["dtype"]]):
            raise CacheFileError(f"cache file is corrupt (bad tensor entry {str(name)[:40]!r}): {path}")
        spans.append(tuple(offsets))
    spans.sort()
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or (spans and spans[0][0] != 0):
        raise CacheFileError(f"cache file is corrupt (tensor data overlaps or leaves gaps): {path}")
    return header, 8 + header_len + (spans[-1][1] if spans else 0)


def _parse_json(raw: bytes) -> dict | None:
    if not raw.startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, numbers too long, nesting too deep
        return None
    return header if isinstance(header, dict) else None


def _diagnose_foreign(head: bytes, size: int, path: Path) -> str:
    """Why a file that is not a readable safetensors file was refused, as precisely as its first bytes say."""
    if size == 0:
        return f"cache file is empty: {path}"
    if head.startswith(b"PK\x03\x04"):
        return (f"not a vlcache cache file: {path} is a zip archive (a torch.save checkpoint?); vlcache never "
                "unpickles files. Re-create the cache with `vlcache cache`")
    # PROTO opcode and a protocol 2-5: a safetensors length can start with 0x80 too (a header of 0x880 bytes)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (f"not a vlcache cache file: {path} looks like a Python pickle; vlcache never unpickles files. "
                "Re-create the cache with `vlcache cache`")
    if _is_text(head):  # a safetensors file starts with a little-endian length, whose high bytes are zero
        return f"not a vlcache cache file: {path} (a text file)"
    if len(head) < 8:
        return f"cache file is truncated: {path}"
    header_len = int.from_bytes(head, "little")
    if 0 < header_len <= _MAX_HEADER_BYTES and header_len > size - 8:
        return f"cache file is truncated: {path}"
    if 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES):
        return f"cache file is corrupt (unreadable header): {path}"
    return f"not a vlcache cache file: {path} (unrecognised format)"


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def read_metadata(path: str | os.PathLike) -> StateMetadata:
    return _metadata(read_header(path), path)


# Field types a file must have: what the readers of the metadata rely on.
_FIELD_TYPES = {"model": str, "fingerprint": str, "dtype": str, "image_sha256": str, "image_size": list,
                "prefix_tokens": int, "image_tokens": int, "created": str, "messages": list, "processor_settings": dict,
                "versions": dict, "format_version": int, "family": str, "layer_kinds": list, "parts": list,
                "reused_tokens": int, "quantization": str}


def _metadata(header: dict, path) -> StateMetadata:
    try:
        fields = json.loads(header["__metadata__"]["metadata"])
        meta = StateMetadata(**fields)
    except (KeyError, TypeError, ValueError, RecursionError):
        raise CacheFileError(f"cache file is corrupt (bad metadata): {path}") from None
    if not all(isinstance(getattr(meta, name), kind) for name, kind in _FIELD_TYPES.items()) or not all(
        isinstance(getattr(meta, name), (str, type(None)))
        for name in ("system_prompt", "image_path", "template_time", "template_sha256")
    ):
        raise CacheFileError(f"cache file is corrupt (bad metadata): {path}")
    if not all(isinstance(kind, str) for kind in meta.layer_kinds):
        raise CacheFileError(f"cache file is corrupt (bad layer kinds): {path}")
    if meta.template_time is not None and not _is_instant(meta.template_time):
        raise CacheFileError(f"cache file is corrupt (bad template time): {path}")
    if not all(isinstance(p, dict) and p.get("type") in ("image", "video") and isinstance(p.get("sha256"), str)
               and isinstance(p.get("size"), list) for p in meta.parts):
        raise CacheFileError(f"cache file is corrupt (bad media parts): {path}")
    if not _conversation_ok(meta.messages, max(1, len(meta.parts))):
        raise CacheFileError(f"cache file is corrupt (bad messages: not a conversation up to its media): {path}")
    return meta


_ROLES = ("system", "user", "assistant")


def _is_instant(text: str) -> bool:
    from datetime import datetime

    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _conversation_ok(messages: list, media_parts: int) -> bool:
    """The shape every reader of `messages` relies on: roles, string or part-list contents, text parts with
    text, as many image and video parts as the state has, the media in a user turn."""
    if not messages:
        return False
    count = 0
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return False
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or message["role"] != "user":
            return False
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind not in ("image", "video"):
                return False
            count += 1
    return count == media_parts



# -- a state's tensors against a model ------------------------------------------------------------------------

FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"
CHUNKED = "chunked_attention"
SHARED = "shared_attention"  # "shared_attention:<i>": the layer reads layer i's K/V and the file stores nothing for it


def shared_source(kind: str) -> int | None:
    """The layer whose K/V a shared layer's kind names ("shared_attention:3" -> 3); None for any other kind."""
    name, _, source = kind.partition(":")
    return int(source) if name == SHARED and source.isdigit() else None


_FLOAT_DTYPES = ("F32", "F16", "BF16")
RECURRENT_DTYPE = "F32"  # a linear-attention layer's recurrent state, in every model's dtype


@dataclass(frozen=True)
class Layout:
    """What a model's state files must hold, layer by layer: a file that disagrees would fail inside a batched
    forward (and with it every other row of the batch), so it is refused before that."""

    kinds: tuple[str, ...]  # per text layer: FULL, SLIDING, CHUNKED, LINEAR or SHARED:<source>
    kv_shapes: tuple[tuple[int, int], ...]  # per text layer: (kv_heads, head_dim) of its K/V (Gemma 4's differ)
    conv_shape: tuple[int, int] | None = None  # a linear-attention layer's conv state: [1, channels, kernel]
    recurrent_shape: tuple[int, int, int] | None = None  # and its recurrent state: [1, heads, key dim, value dim]
    chunk: int | None = None  # a CHUNKED layer's chunk size: it holds at least the last n % chunk tokens
    window: int | None = None  # a SLIDING layer's window: it holds at least the last window - 1 tokens

    def tensors(self, i: int) -> tuple[str, ...]:
        if shared_source(self.kinds[i]) is not None:
            return ()
        return ("conv_state", "recurrent_state") if self.kinds[i] == LINEAR else ("keys", "values")


def check_layout(header: dict, meta: StateMetadata, layout: Layout, source) -> None:
    """Refuse a file whose tensors, by its header alone, do not fit `layout`: every layer's K/V shaped
    [1, kv_heads, tokens, head_dim] in one floating dtype, linear-attention states of the model's sizes, the
    model's layer kinds and nothing else. LayoutError (a CacheFileError) naming the first disagreement."""
    def refuse(why: str):
        raise LayoutError(f"{source} does not fit this model: {why}")

    kinds = list(meta.layer_kinds) or [FULL] * len(layout.kinds)  # files before format 2: all full attention
    if kinds != list(layout.kinds):
        refuse(f"its layer kinds {_kinds_summary(kinds)} are not the model's {_kinds_summary(layout.kinds)}")
    expected = {f"layers.{i}.{name}" for i in range(len(layout.kinds)) for name in layout.tensors(i)}
    found = {name for name in header if name.startswith("layers.")}
    if found != expected:
        odd = sorted(found ^ expected)
        refuse(f"it holds other layer tensors than the model's {len(layout.kinds)} layers ({odd[0][:60]!r})")
    n, dtypes = meta.prefix_tokens, set()
    small = {"input_ids": [1, n], "attention_mask": [1, n], "mm_token_type_ids": [1, n], "rope_deltas": [1, 1]}
    for name, shape in small.items():
        if not isinstance(header.get(name), dict) or header[name].get("shape") != shape:
            refuse(f"its {name} is not shaped {shape}")
    grids = header.get("image_grid_thw")
    grids = grids.get("shape") if isinstance(grids, dict) else None
    if not (isinstance(grids, list) and len(grids) == 2 and 1 <= grids[0] <= max(1, len(meta.parts)) and grids[1] == 3):
        refuse("its image_grid_thw does not match its media parts")
    for i, kind in enumerate(layout.kinds):
        if not layout.tensors(i):
            continue  # a shared layer: nothing of its own (that it names the model's source is in the kinds)
        first, second = (header[f"layers.{i}.{name}"] for name in layout.tensors(i))
        if not all(isinstance(e.get("shape"), list) and e.get("dtype") in _FLOAT_DTYPES for e in (first, second)):
            refuse(f"layer {i} is not floating-point tensors")
        if kind == LINEAR:
            if (first["shape"] != [1, *(layout.conv_shape or ())] or second["shape"] != [1, *(layout.recurrent_shape or ())]):
                refuse(f"layer {i}'s linear-attention state is {first['shape']} and {second['shape']}, the model's "
                       f"[1, {', '.join(map(str, layout.conv_shape or ()))}] and [1, {', '.join(map(str, layout.recurrent_shape or ()))}]")
            # The recurrent state is float32 whatever the model's dtype (as transformers keeps it): another dtype
            # would be copied into the batch's buffers of every row (an empty one, LFM2's, holds nothing).
            if second["dtype"] != RECURRENT_DTYPE and math.prod(second["shape"]):
                refuse(f"layer {i}'s recurrent state is {second['dtype']}; the model keeps it in {RECURRENT_DTYPE}")
            dtypes.add(first["dtype"])
            continue
        shape, (heads, dim) = first["shape"], layout.kv_shapes[i]
        held_ok = len(shape) == 4 and tokens_ok(kind, shape[2], n, layout.chunk, layout.window)
        if second["shape"] != shape or not held_ok or shape[0] != 1 or shape[1] != heads or shape[3] != dim:
            tokens = (n if kind == FULL else f"{n % layout.chunk if layout.chunk else 0}..{n}" if kind == CHUNKED
                      else f"{_sliding_least(n, layout.window)}..{n}")
            refuse(f"layer {i}'s keys and values are {shape} and {second['shape']}, the model's [1, {heads}, "
                   f"{tokens}, {dim}]")
        dtypes.update((first["dtype"], second["dtype"]))
    if len(dtypes) > 1:
        refuse(f"its layers mix dtypes ({', '.join(sorted(dtypes))})")


def tokens_ok(kind: str, held: int, n: int, chunk: int | None = None, window: int | None = None) -> bool:
    """Whether a layer of `kind` holding `held` of a prefix's n tokens is whole: a sliding layer holds at least
    the last window - 1 (all a later token sees; without the window, at least one), a chunked layer at least
    those of its last chunk (without the chunk size, any number; tails: the server's continuations hold more),
    every other layer all n."""
    if kind == SLIDING:
        return _sliding_least(n, window) <= held <= n
    if kind == CHUNKED:
        return (n % chunk if chunk else 0) <= held <= n
    return held == n


def _sliding_least(n: int, window: int | None) -> int:
    return min(n, window - 1) if window else min(n, 1)


def _kinds_summary(kinds) -> str:
    out, last, count = [], None, 0
    for kind in list(kinds) + [None]:
        if kind == last:
            count += 1
            continue
        if last is not None:
            out.append(f"{count} {last}")
        last, count = kind, 1
    return "[" + ", ".join(out) + "]"


# -- a state's identity --------------------------------------------------------------------------------------

def media_identity(parts: list[tuple[str, str]]) -> str:
    """The media of a state, in order, from (kind, sha256) pairs: one image is its hash alone (the keys of
    single-image states stay what they were); otherwise "image:<hash>,video:<hash>,..."."""
    if len(parts) == 1 and parts[0][0] == "image":
        return parts[0][1]
    return ",".join(f"{kind}:{digest}" for kind, digest in parts)


def state_key(fingerprint: str, media: str, messages: list, processor_settings: dict, salt: str | None = None,
              rendered: str | None = None) -> str:
    """A state's identity. `media`: media_identity of its parts. `salt` (a tenant's cache_salt or user) keeps
    its states apart from everyone else's. `rendered`: for a chat template that stamps the time, the sha256 of
    the text the state covers (the same messages render another prefix on another day)."""
    identity = {"fingerprint": fingerprint, "image": media, "messages": messages, "processor": processor_settings}
    if salt is not None:
        identity["salt"] = salt
    if rendered is not None:
        identity["rendered"] = rendered
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def metadata_key(meta: StateMetadata) -> str:
    """The key of the state a file holds, as the server computes it for the same conversation."""
    parts = [(p["type"], p["sha256"]) for p in meta.parts] or [("image", meta.image_sha256)]
    return state_key(meta.fingerprint, media_identity(parts), meta.messages, meta.processor_settings,
                     rendered=meta.template_sha256)
