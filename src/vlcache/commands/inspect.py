"""`vlcache inspect`: what a cache file holds, from its header alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import storage
from .common import media_words


def run_inspect(args: argparse.Namespace) -> int:
    from ..header import read_header, read_metadata

    header = read_header(args.path)
    meta = read_metadata(args.path)
    size = storage.size(args.path) if storage.is_url(args.path) else Path(args.path).stat().st_size
    kv_bytes = sum(
        t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items() if name.startswith("layers.")
    )
    info = {"path": str(args.path), "file_bytes": size, "kv_bytes": kv_bytes, **meta.__dict__}
    if args.json:
        print(json.dumps(info))
        return 0
    turns = sum(1 for m in meta.messages if m.get("role") == "assistant")
    lines = [
        f"file:          {args.path} ({size:,} bytes; KV {kv_bytes:,} bytes)",
        f"model:         {meta.model}",
        f"family:        {meta.family}; layers: {_layer_summary(meta.layer_kinds)}",
        f"fingerprint:   {meta.fingerprint}",
        f"dtype:         {meta.dtype}" + ("" if meta.quantization == "none" else
                                            f" (K/V; the model's language-model weights were {meta.quantization})"),
        f"system prompt: {meta.system_prompt!r}",
        *_part_lines(meta),
        f"max pixels:    {meta.max_pixels or 'processor default'}",
        f"tokens:        {meta.prefix_tokens} ({meta.image_tokens} {media_words(meta)} tokens)",
        f"conversation:  {turns} saved turns" if turns else "conversation:  none (image state)",
        f"created:       {meta.created}",
        *([f"template time: {meta.template_time} (the chat template stamps the time: every question is rendered "
           "at this instant)"] if meta.template_time else []),
        "versions:      " + ", ".join(f"{k} {v}" for k, v in meta.versions.items()),
        f"format:        vlcache {meta.format_version}",
    ]
    print("\n".join(lines))
    return 0


def _part_lines(meta) -> list[str]:
    """One line per image and video of the state (files before format 3 name one image)."""
    parts = meta.parts or [{"type": "image", "path": meta.image_path, "size": meta.image_size, "sha256": meta.image_sha256}]
    lines = []
    for part in parts:
        w, h = part["size"]
        line = f"{part['type'] + ':':<15}{part.get('path') or '(bytes)'} ({w}x{h}, sha256 {part['sha256'][:16]}...)"
        if part["type"] == "video":
            stamps = part.get("timestamps") or [0]
            line += (f"; {part['frames']} frames sampled, at {stamps[0]:g}-{stamps[-1]:g} s, from a source of "
                     f"{part['total_frames']} frames at {part['fps']:g} fps")
        lines.append(line)
    return lines


def _layer_summary(kinds: list) -> str:
    """'3 sliding_attention, 1 full_attention' in layer order of first appearance."""
    if not kinds:
        return "full_attention (a format 1 file)"
    from ..header import SHARED, shared_source

    own = [kind for kind in kinds if shared_source(kind) is None]
    counts = {kind: own.count(kind) for kind in dict.fromkeys(own)}
    out = [f"{n} {kind}" for kind, n in counts.items()]
    shared = [f"{i} reads {shared_source(kind)}" for i, kind in enumerate(kinds) if shared_source(kind) is not None]
    if shared:  # Gemma 4: layers that read another layer's K/V and store none
        out.append(f"{len(shared)} {SHARED} (layer {', '.join(shared)})")
    return ", ".join(out)
