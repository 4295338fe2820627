#!/usr/bin/env python3
"""Scaling out on this machine: photographs cached a minute by `vlcache cache --ray` with 1 and 2 workers (a
local Ray), and reading a state from a local S3 (moto's server on 127.0.0.1) against a local file. The
Qwen3-VL-2B architecture with random weights and the real processor files. Results: docs/benchmarks-scale.md.

    pip install -e '.[s3,ray]' 'moto[server]'
    python bench/scale.py [--workers 1 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import model_dir  # noqa: E402
from run import SHARED, machine  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg", "hubble_deep_field.jpg"]


def ray_rates(model: str, workers: list[int], tmp: Path) -> list[dict]:
    folder = tmp / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(SHARED / "images" / name, folder / name)
    rows = []
    for n in workers:
        out = tmp / f"states-{n}"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "vlcache", "cache", str(folder), "--output-dir", str(out), "--ray",
                               "--workers", str(n), "--model", model], capture_output=True, text=True, timeout=7200,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        manifest = json.loads((out / "manifest.json").read_text())
        busy = sum(r["seconds"] for r in manifest["results"])
        rows.append({"workers": n, "images": len(PHOTOS), "wall_s": wall, "images_per_minute": 60 * len(PHOTOS) / wall,
                     "state_seconds_sum": busy, "summary": done.stderr.strip().splitlines()[-1]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def s3_reads(model: str, repeats: int) -> dict:
    import s3fs
    from moto.server import ThreadedMotoServer

    from vlcache import Engine
    from vlcache.state import load_state

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        s3fs.S3FileSystem().mkdir("bench")
        engine = Engine.load(model, device="cpu")
        state = engine.cache_image(SHARED / "images" / "hubble_deep_field.jpg")
        with tempfile.TemporaryDirectory() as tmp:
            local = state.save(Path(tmp) / "hubble.pt")
            url = state.save("s3://bench/hubble.pt")
            times = {"local file": [], "local S3 (moto)": []}
            for _ in range(repeats):
                for label, where in (("local file", local), ("local S3 (moto)", url)):
                    start = time.perf_counter()
                    load_state(where)
                    times[label].append(time.perf_counter() - start)
            size = local.stat().st_size
    finally:
        server.stop()
    return {"file_bytes": size, "tokens": state.num_tokens, "seconds": times}


def report(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Scaling out on one machine: Ray workers and states in S3",
        "",
        f"Command: `{r['command']}`. Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}, "
        f"native bf16: {m['native_bf16'] or 'none'} (float32); torch {m['torch']}, transformers {m['transformers']}. Model: "
        "Qwen3-VL-2B architecture, random weights, real processor files. A local Ray (started by each call) and a "
        "local S3 (moto's server on 127.0.0.1).",
        "",
        f"## `vlcache cache photos/ --output-dir DIR --ray --workers N` ({len(PHOTOS)} photographs, default system prompt)",
        "",
        "| workers | wall (Ray start, model loads, caching) | photographs a minute | sum of per-image seconds |",
        "| --- | --- | --- | --- |",
    ]
    for row in r["ray"]:
        lines.append(f"| {row['workers']} | {row['wall_s']:.1f} s | {row['images_per_minute']:.2f} | {row['state_seconds_sum']:.1f} s |")
    rates = {row["workers"]: row["images_per_minute"] for row in r["ray"]}
    if 1 in rates and len(rates) > 1:
        most = max(rates)
        lines += ["", f"{most} workers cached {rates[most] / rates[1]:.2f}x as many photographs a minute as one, on the "
                  f"same {m['cores']} cores (the workers share them; the wall includes starting Ray and loading each "
                  "model copy). On a cluster each worker has its own GPU or node."]
    lines += ["", "## Reading a state: local file vs local S3", ""]
    s = r["s3"]
    lines += [f"hubble_deep_field.jpg state: {s['tokens']:,} tokens, {s['file_bytes'] / 2**20:.1f} MiB; `load_state` "
              f"(header first, then the whole file, checked), median of {len(next(iter(s['seconds'].values())))} runs "
              "(min-max):", "", "| from | load_state |", "| --- | --- |"]
    for label, values in s["seconds"].items():
        lines.append(f"| {label} | {statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vlcache-bench")
    args = parser.parse_args()
    model = str(model_dir("full", args.work))
    with tempfile.TemporaryDirectory() as tmp:
        rays = ray_rates(model, args.workers, Path(tmp))
    results = {"command": "python bench/scale.py " + " ".join(sys.argv[1:]), "machine": machine(), "ray": rays,
               "s3": s3_reads(model, args.repeats)}
    (DOCS / "benchmarks-scale.json").write_text(json.dumps(results, indent=1) + "\n")
    (DOCS / "benchmarks-scale.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
