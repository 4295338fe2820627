"""The longest pause of a running answer while another request's large image goes through the vision encoder
(issue 31 finding 8): the encoder as one unit of work (before) against its call in pieces at its vision blocks
(vlcache.pieces, now), on the server's scheduler, in one process.

A text-only row decodes (greedy, no end) while a new image state is computed on the same model thread; the
time of every token the row gets is recorded. Reported per mode: the encoder state's wall time, the decode
steps the row took while it was computed, the row's median gap between tokens before the image arrived, and its
worst gap while the image was computed. The two modes' states are compared tensor for tensor (exactness).

Models: `tiny` (vlcache.testing's tiny Qwen3-VL: a 2-block vision tower) and `2b-vision` (the real
Qwen3-VL-2B's vision tower, 24 blocks of hidden 1024, and its processor and tokenizer, random float32 weights,
over a 2-layer text model of the 2B's width: the encoder is the 2B's, the decode step is short).

Usage: python bench/encoder_pause.py --work-dir /tmp/bpause [--models tiny 2b-vision] [--max-pixels 262144]
       [--json docs/benchmarks-encoder-pause.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO.parent / "shared" / "images" / "hubble_deep_field.jpg"
QUESTION = "Write a very long story about a rocket, a cat and a cup of coffee."
sys.path.insert(0, str(Path(__file__).parent))


def build(kind: str, work: Path) -> Path:
    folder = work / kind
    if (folder / "config.json").exists():
        return folder
    if kind == "tiny":
        from vlcache.testing import build_tiny_checkpoint

        return build_tiny_checkpoint(folder)
    from transformers import Qwen3VLConfig

    from decode import REAL, save_thin

    config = Qwen3VLConfig.from_pretrained(REAL)
    config.text_config.num_hidden_layers = 2  # the vision tower stays the 2B's; a short decode step
    return save_thin(config, folder)


def one_unit(blocks, run):
    """The encoder call as one unit of work (before vlcache.pieces)."""
    with torch.inference_mode():
        return run()
    yield  # noqa: unreachable - makes this a generator


def measure(engine, max_pixels: int, pieces: bool) -> dict:
    from vlcache import prompt
    from vlcache.engine import GenerationOptions
    from vlcache.families import qwen
    from vlcache.media import MediaOptions
    from vlcache.serving.scheduler import Job, Scheduler

    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": [{"type": "image"}]}]
    prepared = engine.prepare_media([IMAGE], messages, MediaOptions(max_pixels=max_pixels))
    times, finished = [], threading.Event()

    def emit(kind, value):
        if kind == "delta":
            times.append(time.perf_counter())
        else:
            finished.set()

    ids = prompt.text_only_ids(engine.processor, None, QUESTION).to(engine.device)
    job = Job(kv=engine.empty_kv(), history=ids[:, :0], new_ids=ids, rope_delta=0,
              options=GenerationOptions(max_new_tokens=100_000, temperature=0,  # never ends on its own
                                        logit_bias={int(t): -100.0 for t in engine.eos_ids}), emit=emit)
    real = qwen.in_pieces
    qwen.in_pieces = real if pieces else one_unit
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=256)
    try:
        scheduler.submit(job)
        while len(times) < 12 and not finished.is_set():
            time.sleep(0.005)
        start = time.perf_counter()
        state = scheduler.compute(lambda: engine.prefill_media_steps(prepared, 256)).result(timeout=1800)
        end = time.perf_counter()
        time.sleep(0.2)
        job.cancelled.set()
        finished.wait(60)
    finally:
        scheduler.stop()
        qwen.in_pieces = real
    before = [b - a for a, b in zip(times, times[1:]) if b < start]
    during = [b - a for a, b in zip(times, times[1:]) if b > start and a < end]
    if finished.is_set() and len(times) < 12:
        raise SystemExit("error: the running row ended before the image was sent")
    return {"mode": "pieces" if pieces else "one unit", "encode_s": end - start, "image_tokens": state.metadata.image_tokens,
            "prefix_tokens": state.num_tokens, "steps_during": sum(1 for t in times if start < t < end),
            "median_gap_before_s": statistics.median(before[2:]), "worst_gap_during_s": max(during), "state": state}


def same(a, b) -> bool:
    return torch.equal(a.input_ids, b.input_ids) and all(
        torch.equal(x, y) for (ak, av), (bk, bv) in zip(a.kv, b.kv) for x, y in ((ak, bk), (av, bv)))


def run(kind: str, work: Path, max_pixels: int) -> dict:
    from vlcache import Engine, pieces

    engine = Engine.load(str(build(kind, work)), device="cpu", dtype="float32")
    blocks = len(pieces.vision_blocks(engine.model))
    measure(engine, 64 * 64 * 4, True)  # warm-up: first calls allocate and pick kernels
    before, after = measure(engine, max_pixels, False), measure(engine, max_pixels, True)
    exact = same(before.pop("state"), after.pop("state"))
    return {"model": kind, "vision_blocks": blocks, "max_pixels": max_pixels, "exact": exact, "runs": [before, after]}


def report(results: list[dict]) -> str:
    lines = ["| model | vision blocks | image tokens | mode | encoder state s | row's steps meanwhile | median gap before ms | worst gap during ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m in r["runs"]:
            lines.append(f"| {r['model']} | {r['vision_blocks']} | {m['image_tokens']} | {m['mode']} | {m['encode_s']:.2f} | "
                         f"{m['steps_during']} | {m['median_gap_before_s'] * 1000:.1f} | {m['worst_gap_during_s'] * 1000:.0f} |")
    lines += ["", "States equal tensor for tensor in both modes: " + ", ".join(f"{r['model']} {r['exact']}" for r in results)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["tiny", "2b-vision"], choices=["tiny", "2b-vision"])
    parser.add_argument("--max-pixels", type=int, default=512 * 512)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = [run(kind, args.work_dir, args.max_pixels) for kind in args.models]
    machine = {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__}
    print(report(results))
    print(f"\nmachine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
