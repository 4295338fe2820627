#!/usr/bin/env python3
"""Time to first token about a video, uncached against cached, with the Qwen3-VL-2B architecture (random weights,
the real processor files from ../shared): the sample clip (4 s, 320x240) and a 30-second 1280x720 clip made
on the spot (a pan over a photograph, H.264, 30 fps). Results: docs/benchmarks-video.md and .json.

    python bench/video.py                 # builds the random 2B checkpoint under ~/.cache/vlcache-bench if needed
    python bench/video.py --clips sample  # only the sample clip

- uncached: what each question costs without vlcache: decode and sample the clip, the processor, and
  transformers' generate (vision encoder + prefill of the whole prompt) up to its first token.
- cached, from file: a fresh read of the state file (`engine.load_state`), then the question's prefill and
  the first token. cached, in memory: the state already loaded (a long-running process or the server).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import model_dir  # noqa: E402
from run import SHARED, machine  # noqa: E402

QUESTION = "What happens in this video?"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def clips(work: Path, which: list[str]) -> dict[str, Path]:
    from vlcache.testing.clips import make_clip

    out = {}
    if "sample" in which:
        out["sample clip (4 s, 320x240, 8 fps)"] = SHARED / "videos" / "hubble_pan.mp4"
    if "30s" in which:
        out["30 s, 1280x720, 30 fps"] = make_clip(work / "pan30.mp4", seconds=30, fps=30, size=(1280, 720),
                                                   source=SHARED / "images" / "hubble_deep_field.jpg")
    return out


def uncached_ttft(engine, path: Path) -> tuple[float, int]:
    """Seconds from the file to generate()'s first token, and the prompt length (nothing reused)."""
    import torch

    from vlcache import prompt, video

    start = time.perf_counter()
    data, name = video.read_video_bytes(path)
    info = video.probe(data, name, video.MAX_DECODE_PIXELS)
    indices = engine.family.video_indices(info, None, None)
    frames = video.decode(data, name, info, indices, None)
    loaded = video.LoadedVideo(frames=frames, indices=indices, info=info, sha256="", path=None)
    messages = prompt.with_question(prompt.media_conversation(None, ["video"]), QUESTION)
    text = prompt.render(engine.processor, messages, add_generation_prompt=True)
    inputs = engine.processor(text=[text], return_tensors="pt", **engine.family.media_kwargs([], [loaded], {}))
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(engine.dtype)
    with torch.inference_mode():
        engine.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - start, int(inputs["input_ids"].shape[1])


def measure(engine, label: str, path: Path, work: Path, repeats: int) -> dict:
    start = time.perf_counter()
    state = engine.cache([path], system_prompt=None)
    cache_s = time.perf_counter() - start
    file = state.save(work / "state.pt")
    part = state.metadata.parts[0]
    uncached, prompt_tokens = uncached_ttft(engine, path)
    from_file, in_memory = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = engine.load_state(file)
        answer = engine.ask(loaded, QUESTION, max_new_tokens=1, temperature=0)
        from_file.append(time.perf_counter() - start)
        in_memory.append(engine.ask(state, QUESTION, max_new_tokens=1, temperature=0).timings["ttft_s"])
    del loaded
    result = {
        "clip": label, "clip_bytes": path.stat().st_size, "source": f"{part['size'][0]}x{part['size'][1]}, "
        f"{part['total_frames']} frames at {part['fps']:g} fps", "frames_sampled": part["frames"],
        "grid": part["grid"], "state_tokens": state.num_tokens, "video_tokens": state.metadata.image_tokens,
        "prompt_tokens": prompt_tokens, "cache_s": cache_s, "state_file_bytes": file.stat().st_size,
        "uncached_ttft_s": uncached, "cached_from_file_ttft_s": statistics.median(from_file),
        "cached_in_memory_ttft_s": statistics.median(in_memory), "question_tokens": answer.prompt_tokens - answer.cached_tokens,
    }
    file.unlink()
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Video: time to first token, uncached vs cached",
        "",
        f"Command: `{results['command']}`. Machine: {m['cpu']}, {m['cores']} cores, CPU capability "
        f"{m['cpu_capability']}, native bf16: {m['native_bf16'] or 'none'}; torch {m['torch']}, transformers {m['transformers']}. "
        f"Model: Qwen3-VL-2B architecture with random weights and the real processor files, {results['dtype']} "
        f"(`--dtype auto` on this CPU). Video sampling: the processor's defaults (2 frames a second, at least 4).",
        "",
        "| clip | frames sampled | video tokens (state) | uncached TTFT | cached TTFT, state from file | cached TTFT, in memory | speed-up (file / memory) | caching once | state file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['clip']} ({r['clip_bytes'] / 2**20:.2f} MiB) | {r['frames_sampled']} of {r['source']} | "
            f"{r['video_tokens']:,} ({r['state_tokens']:,}) | {r['uncached_ttft_s']:.2f} s | "
            f"{r['cached_from_file_ttft_s']:.2f} s | {r['cached_in_memory_ttft_s']:.3f} s | "
            f"{r['uncached_ttft_s'] / r['cached_from_file_ttft_s']:.0f}x / {r['uncached_ttft_s'] / r['cached_in_memory_ttft_s']:.0f}x | "
            f"{r['cache_s']:.2f} s | {r['state_file_bytes'] / 2**20:,.1f} MiB |")
    lines += [
        "",
        "Uncached: decode and sample the clip, the processor, and transformers' `generate` to its first token "
        "(vision encoder and prefill of the whole prompt), as every question costs without a cache. Cached: "
        "`engine.load_state` (reads the whole file) and the question's prefill to the first token; in memory: "
        f"the question alone. Medians of {results['repeats']} runs for the cached figures, one run for the uncached "
        "and the caching. The state file is the float32 K/V of every prompt token: 28 layers x 8 KV heads x 128 x 2 "
        "x 4 bytes = 224 KiB a token.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="+", choices=["sample", "30s"], default=["sample", "30s"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vlcache-bench")
    args = parser.parse_args()
    from vlcache import Engine

    engine = Engine.load(str(model_dir("full", args.work)), device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in clips(Path(tmp), args.clips).items():
            rows.append(measure(engine, label, path, Path(tmp), args.repeats))
    results = {"command": "python bench/video.py " + " ".join(sys.argv[1:]), "machine": machine(),
               "dtype": str(engine.dtype).removeprefix("torch."), "repeats": args.repeats, "rows": rows}
    (DOCS / "benchmarks-video.json").write_text(json.dumps(results, indent=1) + "\n")
    (DOCS / "benchmarks-video.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
