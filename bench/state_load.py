#!/usr/bin/env python3
"""Time to read a state of the 2B architecture: `load_state` (read into memory, checked) against the memory-mapped
`safe_open` it replaced (which reads nothing until the tensors are used). Figures in docs/benchmarks.md.

    python bench/state_load.py    # builds the random 2B checkpoint under ~/.cache/vlcache-bench if needed
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import model_dir  # noqa: E402
from run import SHARED  # noqa: E402


def main() -> None:
    from safetensors import safe_open

    from vlcache import Engine
    from vlcache.state import load_state

    engine = Engine.load(str(model_dir("full", Path.home() / ".cache" / "vlcache-bench")), device="cpu")
    with tempfile.TemporaryDirectory() as work:
        path = engine.cache_image(SHARED / "images" / "hubble_deep_field.jpg").save(Path(work) / "hubble.pt")

        def mapped():
            with safe_open(str(path), framework="pt") as fh:
                return {name: fh.get_tensor(name) for name in fh.keys()}

        for name, load in (("load_state (read into memory)", lambda: load_state(path)), ("safe_open (memory-mapped)", mapped)):
            load()  # the page cache warm for both
            times = []
            for _ in range(5):
                start = time.perf_counter()
                load()
                times.append(time.perf_counter() - start)
            print(f"{name}: median {statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f}), "
                  f"file {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
