"""`vlcache demo-model DIR`: a small Qwen3-VL with random weights, written here, to try vlcache without a
download (offline, on a laptop). Its answers are noise; everything else (the processor, caching, files, the
server, the page) is what the real model goes through."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..console import info
from ..errors import VlcacheError

LABEL = """# A vlcache demo model: RANDOM WEIGHTS

Written by `vlcache demo-model`: a tiny Qwen3-VL (2 layers, hidden size 64) with random weights, a small
byte-level tokenizer with Qwen's special tokens, Qwen3-VL's chat template (reduced) and image and video
processors. Its answers are meaningless text. It exists to try vlcache offline (cache, ask, chat, serve, the
chat page) without downloading a model: `VLCACHE_MODEL={folder}`.
"""


def run_demo_model(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise VlcacheError(f"{folder} exists and is not an empty folder; name a new folder for the demo model")
    from ..model import quiet_transformers
    from ..testing import build_tiny_checkpoint

    quiet_transformers(verbose=getattr(args, "verbose", False))  # transformers' "Writing model shards" bar
    build_tiny_checkpoint(folder)
    (folder / "README.md").write_text(LABEL.format(folder=folder.resolve()))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    info(f"wrote a demo model with RANDOM weights ({size / 2**20:.1f} MiB; its answers are noise) to {folder}; "
         f"try it: export VLCACHE_MODEL={folder.resolve()}")
    print(folder.resolve())
    return 0
