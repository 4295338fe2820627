"""ImageState: the model's state after the system prompt and the image, and its file format.

The file is safetensors whatever its name (the guide's `.pt` names work): per-layer K/V in the model's compute
dtype, the prefix token ids and their multimodal bookkeeping, and JSON metadata in the header. Loading reads
the header first and refuses anything that is not a vlcache file before a tensor is touched; nothing is ever
unpickled.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from . import storage
from .errors import CacheFileError
from .header import (  # noqa: F401 - the header's readers are part of this module's interface
    _MAX_HEADER_BYTES, FORMAT_NAME, FORMAT_VERSION, Layout, StateMetadata, _cache_path, _check_header, _metadata,
    check_layout, read_header, read_metadata, shared_source, tokens_ok,
)

_STALE_TMP_SECONDS = 3600  # a save killed midway leaves a temporary file; later saves remove ones this old
# Stored narrow, restored to long: ids fit int32, masks and token types fit int8.
_NARROW = {"input_ids": torch.int32, "attention_mask": torch.int8, "mm_token_type_ids": torch.int8}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}
_SMALL_TENSORS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "rope_deltas")


@dataclass
class ImageState:
    """Prefix KV and everything needed to continue from it. Asking never changes a state."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each [1, kv_heads, prefix_tokens, head_dim]
    input_ids: torch.Tensor  # [1, prefix_tokens] long
    attention_mask: torch.Tensor  # [1, prefix_tokens] long
    mm_token_type_ids: torch.Tensor  # [1, prefix_tokens] long (1 marks image tokens)
    image_grid_thw: torch.Tensor  # [k, 3] long: grids of the images, then the videos (zeros if the family has none)
    rope_deltas: torch.Tensor  # [1, 1] long: M-RoPE position shift of every token after the image
    metadata: StateMetadata

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def kv_bytes(self) -> int:
        return kv_nbytes(self.kv)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ImageState":
        """On `device`, K/V and conv states in `dtype`; recurrent states stay float32, as the model keeps them."""
        kv = []
        for (k, v), kind in zip(self.kv, self.metadata.layer_kinds or [FULL_ATTENTION] * len(self.kv)):
            if k is None:  # a shared layer: nothing of its own
                kv.append((None, None))
            elif kind == LINEAR_ATTENTION:  # the recurrent state in float32 (empty ones keep theirs: nothing in them)
                kv.append((k.to(device=device, dtype=dtype or k.dtype), v.to(device=device, dtype=torch.float32 if v.numel() else v.dtype)))
            else:
                kv.append((k.to(device=device, dtype=dtype or k.dtype), v.to(device=device, dtype=dtype or v.dtype)))
        small = {name: getattr(self, name).to(device) for name in _SMALL_TENSORS}
        return ImageState(kv=kv, metadata=copy.deepcopy(self.metadata), **small)

    def _tensors(self) -> tuple[dict, dict]:
        """What the file holds: its tensors (on the CPU) and the header's metadata."""
        tensors = {}
        for i, (k, v) in enumerate(self.kv):
            if k is None:
                continue  # a shared layer: its kind names the layer it reads, it stores nothing
            first, second = _layer_tensor_names(self.metadata.layer_kinds, i)
            tensors[f"layers.{i}.{first}"] = k.detach().contiguous().cpu()
            tensors[f"layers.{i}.{second}"] = v.detach().contiguous().cpu()
        for name in _SMALL_TENSORS:
            tensors[name] = getattr(self, name).to("cpu", _NARROW.get(name, torch.long)).contiguous()
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "metadata": json.dumps(asdict(self.metadata))}
        return tensors, header

    def to_bytes(self) -> bytes:
        """The cache file's bytes (what save writes)."""
        tensors, header = self._tensors()
        return safetensors_save(tensors, metadata=header)

    def pieces(self, size: int = 1 << 20):
        """The cache file's bytes (what to_bytes gives, tensors possibly in another order) in pieces of at most
        `size` bytes, from the tensors as they are: sending a state held in memory needs no copy of it whole."""
        tensors, header = self._tensors()
        names, entries, offset = sorted(tensors), {"__metadata__": header}, 0
        for name in names:
            t = tensors[name]
            entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + t.numel() * t.element_size()]}
            offset += t.numel() * t.element_size()
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data that follows to 8 bytes
        yield len(text).to_bytes(8, "little") + text
        for name in names:
            flat = tensors[name].reshape(-1).view(torch.uint8)
            for start in range(0, flat.numel(), size):
                yield flat[start : start + size].numpy().tobytes()

    def save(self, path: str | os.PathLike) -> Path | str:
        """Write atomically: a temporary file beside the target, then a rename (an fsspec URL: one PUT)."""
        tensors, header = self._tensors()
        if storage.is_url(path):
            storage.write_atomic(str(path), safetensors_save(tensors, metadata=header))
            return str(path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.chmod(tmp, 0o666 & ~storage.umask())  # mkstemp makes 0600; a cache is as shareable as any file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"


def _layer_tensor_names(kinds: list, i: int) -> tuple[str, str]:
    """A layer's two tensors: keys and values, or a linear-attention layer's conv and recurrent state."""
    if kinds and i < len(kinds) and kinds[i] == LINEAR_ATTENTION:
        return "conv_state", "recurrent_state"
    return "keys", "values"


def kv_nbytes(kv) -> int:
    """Bytes of per-layer (keys, values) tensors."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv if k is not None)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of saves to `path` that were killed midway (old enough that no save is still writing)."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass


def load_state(path: str | os.PathLike, device: torch.device | str = "cpu", layout: Layout | None = None) -> ImageState:
    """Read a state file onto `device`; checks structure, and with `layout` that its tensors fit that model
    (which model it belongs to is the Engine's check).

    The header is read and checked first (against `layout` too, before a tensor is read); then the whole file
    is read into memory (no memory map: a file that another process truncates meanwhile would kill this one
    with SIGBUS) and checked against that header again.
    """
    header = read_header(path)
    if layout is not None:
        check_layout(header, _metadata(header, path), layout, path)
    try:
        data = storage.read_bytes(str(path)) if storage.is_url(path) else _cache_path(path).read_bytes()
    except OSError as exc:
        raise CacheFileError(f"cannot read cache file {path}: {exc.strerror or exc}") from None
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    raw = data[8 : 8 + header_len] if 0 < header_len <= min(len(data) - 8, _MAX_HEADER_BYTES) else b""
    header = _check_header(data[:8], raw, len(data), path)  # the bytes read, not the earlier look
    metadata = _metadata(header, path)
    if layout is not None:
        check_layout(header, metadata, layout, path)
    try:
        tensors = safetensors_load(data)
        del data
        kinds = metadata.layer_kinds
        n_layers = len(kinds) or sum(1 for n in tensors if n.endswith(".keys"))  # format 1: no kinds, all full
        kv = [_read_layer(tensors, kinds, i, device) for i in range(n_layers)]
        small = {name: tensors[name].long().to(device) for name in _SMALL_TENSORS}
    except (SafetensorError, KeyError, OSError, RuntimeError, ValueError) as exc:
        raise CacheFileError(f"cache file is corrupt: {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    state = ImageState(kv=kv, metadata=metadata, **small)
    _check_shapes(state, path)
    return state


def _read_layer(tensors: dict, kinds: list, i: int, device) -> tuple:
    if kinds and shared_source(kinds[i]) is not None:
        return None, None
    return tuple(tensors[f"layers.{i}.{name}"].to(device) for name in _layer_tensor_names(kinds, i))


def _check_shapes(state: ImageState, path) -> None:
    n = state.metadata.prefix_tokens
    kinds = state.metadata.layer_kinds or ["full_attention"] * len(state.kv)
    ok = bool(state.kv) and len(kinds) == len(state.kv) and all(
        _layer_ok(k, v, kind, n) for (k, v), kind in zip(state.kv, kinds))
    ok = ok and all(getattr(state, name).shape == (1, n) for name in ("input_ids", "attention_mask", "mm_token_type_ids"))
    grids = state.image_grid_thw.shape
    ok = ok and len(grids) == 2 and 1 <= grids[0] <= max(1, len(state.metadata.parts)) and grids[1] == 3
    ok = ok and tuple(state.rope_deltas.shape) == (1, 1)
    if not ok:
        raise CacheFileError(f"cache file is corrupt (tensor shapes disagree with its metadata): {path}")


def _layer_ok(k, v, kind: str, n: int) -> bool:
    """A layer's tensors against its kind, for a prefix of n tokens, without the model: a linear-attention layer
    stores a conv state [1, channels, kernel] and a recurrent state [1, heads, dk, dv], a shared layer nothing
    (its kind names the layer whose K/V it reads), every other layer K/V of as many tokens as tokens_ok allows
    (the model's window and chunk size are its layout's check)."""
    if shared_source(kind) is not None:
        return k is None and v is None
    if k is None or v is None:
        return False
    if kind == LINEAR_ATTENTION:
        return k.ndim == 3 and v.ndim == 4 and k.shape[0] == v.shape[0] == 1
    if not (k.ndim == 4 and k.shape == v.shape and k.shape[0] == 1):
        return False
    return tokens_ok(kind, k.shape[2], n)


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def check_state_layout(state: ImageState, layout: Layout, source) -> None:
    """check_layout for a state in memory: its tensors described as a file's header would describe them."""
    header = {}
    for i, (first, second) in enumerate(state.kv):
        for name, tensor in zip(_layer_tensor_names(state.metadata.layer_kinds, i), (first, second)):
            if tensor is not None:
                header[f"layers.{i}.{name}"] = {"shape": list(tensor.shape), "dtype": _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))}
    for name in _SMALL_TENSORS:
        header[name] = {"shape": list(getattr(state, name).shape), "dtype": "I64"}
    check_layout(header, state.metadata, layout, source)
