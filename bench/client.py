#!/usr/bin/env python3
"""The guide's flow, one fresh process per question, with and without a running server: wall seconds per question
at the Qwen3-VL-2B architecture (random weights, the real processor files), 16 new tokens, greedy. Results:
docs/benchmarks-client.md and .json.

    python bench/client.py [--runs 3] [--image hubble_deep_field.jpg]

- uncached: `vlcache ask --image PHOTO` (the image processed in the question's own process)
- cached, no server: `python scripts/run_smart_prompt.py --cache FILE` (the model loads in the process)
- cached, through a server: the same with `--server URL` (a `vlcache serve` started once beforehand); the
  first call uploads the cache file, the later ones send only the question.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What colors dominate the scene?"
DOCS = REPO / "docs"


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr}")
    return wall, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default="hubble_deep_field.jpg")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vlcache-bench")
    args = parser.parse_args()
    model = str(model_dir("full", args.work))
    image = SHARED / "images" / args.image
    python = sys.executable
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLCACHE_SERVER", None)
    ask = ["--prompt", QUESTION, "--max_new_tokens", "16", "--temperature", "0", "--json"]
    rows: dict[str, list[float]] = {"uncached": [], "cached, model loaded in the process": [],
                                    "cached, through a running server": []}
    answer_s: dict[str, list[float]] = {label: [] for label in rows}  # the answer's own time (prefill + decode)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "photo_cache.pt"
        cache_s, _ = timed([python, "-m", "vlcache", "cache", str(image), "--output", str(cache), "--model", model], env)
        answers = {}
        for _ in range(args.runs):
            wall, out = timed([python, "-m", "vlcache", "ask", "--image", str(image), "--model", model, "--max-new-tokens",
                               "16", "--temperature", "0", "--json", "--prompt", QUESTION], env)
            rows["uncached"].append(wall)
            answers["uncached"] = json.loads(out)["token_ids"]
            answer_s["uncached"].append(json.loads(out)["timings"]["total_s"] + json.loads(out)["timings"]["image_prefill_s"])
            wall, out = timed([python, str(REPO / "scripts" / "run_smart_prompt.py"), "--cache", str(cache), *ask], env)
            rows["cached, model loaded in the process"].append(wall)
            answers["local"] = json.loads(out)["token_ids"]
            answer_s["cached, model loaded in the process"].append(json.loads(out)["timings"]["total_s"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        home = Path(tmp) / "home"
        server_env = {**env, "VLCACHE_HOME": str(home)}
        start_s, url = timed([python, "-m", "vlcache", "serve", "--detach", "--model", model, "--port", str(port),
                              "--cache-dir", str(Path(tmp) / "states")], server_env)
        url = url.strip()
        try:
            first_s, out = timed([python, str(REPO / "scripts" / "run_smart_prompt.py"), "--cache", str(cache), *ask,
                                  "--server", url], env)
            for _ in range(args.runs):
                wall, out = timed([python, str(REPO / "scripts" / "run_smart_prompt.py"), "--cache", str(cache), *ask,
                                   "--server", url], env)
                rows["cached, through a running server"].append(wall)
                answer_s["cached, through a running server"].append(json.loads(out)["timings"]["total_s"])
            answers["server"] = json.loads(out)["token_ids"]
        finally:
            subprocess.run([python, "-m", "vlcache", "stop"], env=server_env, capture_output=True)
    same = answers["local"] == answers["server"]
    results = {
        "command": "python bench/client.py " + " ".join(sys.argv[1:]), "machine": machine(), "image": args.image,
        "runs": args.runs, "seconds": rows, "answer_seconds": answer_s, "cache_command_s": cache_s, "server_start_s": start_s,
        "first_call_with_upload_s": first_s, "server_answer_equals_local": same,
    }
    (DOCS / "benchmarks-client.json").write_text(json.dumps(results, indent=1) + "\n")
    (DOCS / "benchmarks-client.md").write_text(report(results))
    print(report(results))


def report(r: dict) -> str:
    m = r["machine"]
    base = statistics.median(r["seconds"]["uncached"])
    lines = [
        "# The guide's flow with and without a running server",
        "",
        f"Command: `{r['command']}`. Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}, "
        f"native bf16: {m['native_bf16'] or 'none'} (so `--dtype auto` computes in float32); torch {m['torch']}, transformers "
        f"{m['transformers']}. Model: Qwen3-VL-2B architecture, random weights, real processor files. One fresh "
        f"process per question, \"{QUESTION}\" about {r['image']}, 16 new tokens, greedy; medians of {r['runs']} runs "
        "(min-max).",
        "",
        "| one question, fresh process | wall | speed-up over uncached | of which the answer itself (image, prefill, decode) | the rest: start, imports, model load, transfer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, values in r["seconds"].items():
        median, own = statistics.median(values), statistics.median(r["answer_seconds"][label])
        lines.append(f"| {label} | {median:.2f} s ({min(values):.2f}-{max(values):.2f}) | {base / median:.1f}x | "
                     f"{own:.2f} s | {median - own:.2f} s |")
    lines += [
        "",
        f"The first call through the server, which uploads the cache file, took {r['first_call_with_upload_s']:.2f} s; "
        f"starting the server (`vlcache serve --detach`, until it answers) {r['server_start_s']:.1f} s, once; "
        f"`vlcache cache` of the image {r['cache_command_s']:.1f} s, once. The server's answer equals the local "
        f"one token for token: {r['server_answer_equals_local']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
