"""Memory of many rows about one state (issue 28): Engine.ask_many's peak growth against the state's bytes.

A Qwen3-VL with the 2B's K/V geometry (28 layers, 8 K/V heads of 128: 224 KiB a token in float32) but thin
everywhere else (hidden 64, a 2-block vision tower), the real processor, random weights, float32, eager steps.
One photograph is cached (about 860 tokens), then ask_many asks R questions about it (greedy, 8 new tokens).
Each R runs in a fresh process (glibc's mmap threshold fixed at 64 KiB): peak RSS growth (VmHWM after, reset before, minus VmRSS before) during
ask_many, and the bytes of K/V the batch held (its slot tensors before the pool; the most blocks in use after).

Usage: python bench/paged.py --work-dir /tmp/bpaged [--rows 1 16 64] [--json docs/benchmarks-paged.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "models" / "qwen3-vl-2b-instruct"
PHOTO = REPO.parent / "shared" / "images" / "hubble_deep_field.jpg"  # 1000x872: about 860 tokens
sys.path.insert(0, str(Path(__file__).parent))
from decode import save_thin  # noqa: E402 - a sibling benchmark's builder: the same thin 2B checkpoint files

QUESTIONS = ["What is in the picture?", "Describe the colours.", "Who is this?", "Where was this taken?"]


def build(folder: Path) -> Path:
    """The 2B's config with its K/V geometry kept and everything else thin."""
    from transformers import Qwen3VLConfig


    if (folder / "config.json").exists():
        return folder
    config = Qwen3VLConfig.from_pretrained(REAL)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads = 64, 128, 16  # K/V: 8 heads of 128, kept
    vision = config.vision_config
    vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, 64, 128, 4
    vision.out_hidden_size, vision.deepstack_visual_indexes = 64, [0]
    return save_thin(config, folder)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(folder: Path, rows: int) -> dict:
    """In this process: cache the photograph, then ask_many with `rows` questions; the memory figures."""
    from vlcache import Engine
    from vlcache.state import kv_nbytes

    torch.set_num_threads(1)
    engine = Engine.load(str(folder), device="cpu", dtype="float32", compile="off")
    state = engine.cache_image(str(PHOTO))
    made = []
    real = engine.batch
    engine.batch = lambda: made.append(real()) or made[-1]
    prompts = [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(rows)]
    engine.ask_many(state, prompts[:1], max_new_tokens=2, temperature=0)  # warm: allocator pools, lazy imports
    made.clear()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    engine.ask_many(state, prompts, max_new_tokens=8, temperature=0)
    peak = _status("VmHWM") - before
    held = sum(_held_bytes(batch.cache) for batch in made)
    out = {"rows": rows, "state_tokens": state.num_tokens, "state_bytes": kv_nbytes(state.kv), "peak_growth_bytes": peak,
           "batch_kv_bytes": held}
    out["peak_over_state"] = round(peak / out["state_bytes"], 2)
    out["held_over_state"] = round(held / out["state_bytes"], 2)
    blocks = getattr(made[-1].cache, "block_stats", None)
    if blocks is not None:
        out["blocks"] = blocks()
    return out


def _held_bytes(cache) -> int:
    """Bytes of K/V a batch's cache holds: its slot tensors before issue 28; after, the most blocks in use at
    once (the pool's tensors are reserved, committed only where written)."""
    pool = getattr(cache, "pool", None)
    if pool is not None:
        return sum(blocks.peak * pool.block_bytes(kind) for kind, blocks in pool.pools.items())
    total = 0
    for _, layer in cache.attention_layers():
        for name in ("_keys", "_values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = build(args.work_dir / "kv2b-thin")
    if args.one is not None:
        print(json.dumps(one(folder, args.one)))
        return 0
    results = []
    for rows in args.rows:
        # A fixed mmap threshold: freed tensors go back to the system, so the warm-up's memory is not reused
        # and the peak counts what ask_many itself takes.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run([sys.executable, __file__, "--work-dir", str(args.work_dir), "--one", str(rows)],
                              capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{rows:>3} rows: state {r['state_tokens']} tokens, {r['state_bytes'] / 2**20:.0f} MiB; peak growth "
              f"{r['peak_growth_bytes'] / 2**20:.0f} MiB ({r['peak_over_state']}x); batch K/V held "
              f"{r['batch_kv_bytes'] / 2**20:.0f} MiB ({r['held_over_state']}x) {r.get('blocks', '')}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
