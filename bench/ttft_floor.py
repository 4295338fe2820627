"""Cached time to first token against its floor, alternating in one process (issue 28's TTFT bar: <= 1.1x).

Cached: `Engine.ask` on a state in memory, first token only (question ids, the state written into K/V blocks,
the question's prefill through the block tables, the first sample). Floor: one bare forward of the same question
tokens over a plain transformers DynamicCache of the same K/V (built untimed). The two alternate, round by round,
so machine load falls on both alike; medians and spreads are reported. `--clock cpu` times the main thread's CPU
seconds instead of wall time (with one torch thread every kernel runs on it): a comparison that other processes
on a busy machine disturb far less, for when no quiet window is at hand.

Usage: python bench/ttft_floor.py --work-dir /tmp/bttft [--threads 2] [--rounds 9] [--clock wall|cpu]
           [--images astronaut.png hubble_deep_field.jpg] [--json out.json]
Model: the Qwen3-VL-2B architecture with random weights (the real config, processor and template), in the dtype
--dtype auto picks; prints a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
QUESTION = "What is shown in this picture? Describe it briefly."
sys.path.insert(0, str(Path(__file__).parent))


def measure(engine, image: Path, rounds: int, clock) -> dict:
    from transformers import DynamicCache

    from vlcache import generate

    state = engine.cache_image(image)
    new_ids = engine.question_ids(state.metadata.messages, QUESTION, state.metadata.template_time)
    delta = int(state.rope_deltas.view(-1)[0])

    def cached() -> float:
        start = clock()
        engine.ask(state, QUESTION, max_new_tokens=1, temperature=0)
        return clock() - start

    def floor() -> float:
        cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in state.kv], config=engine.model.config)
        positions = generate.text_positions(engine.family.positions, state.num_tokens, new_ids.shape[1], delta,
                                            engine.device)
        start = clock()
        with torch.inference_mode():
            engine.model(input_ids=new_ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return clock() - start

    cached(), floor()  # warm-up: lazy imports, allocator pools
    times = {"cached": [], "floor": []}
    for i in range(rounds):  # alternate, and alternate which goes first
        for name in (("cached", "floor") if i % 2 == 0 else ("floor", "cached")):
            times[name].append(cached() if name == "cached" else floor())
    return {"image": image.name, "state_tokens": state.num_tokens, "question_tokens": int(new_ids.shape[1]), **times,
            "ratio": statistics.median(times["cached"]) / statistics.median(times["floor"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--images", nargs="+", default=["astronaut.png", "hubble_deep_field.jpg"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        args.threads = 1  # CPU seconds of the main thread count every kernel only with one torch thread
    if args.threads:
        torch.set_num_threads(args.threads)
    from run import machine

    from vlcache import Engine
    from vlcache.testing import build_random_checkpoint

    folder = args.work_dir / "qwen3-vl-2b-random"
    if not (folder / "model.safetensors").exists():
        build_random_checkpoint(SHARED / "models" / "qwen3-vl-2b-instruct" / "config.json", folder)
    engine = Engine.load(str(folder), device="cpu", dtype="auto")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    results = [measure(engine, SHARED / "images" / name, args.rounds, clock) for name in args.images]
    report = {"machine": machine(), "dtype": str(engine.dtype), "clock": args.clock, "rounds": args.rounds,
              "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    unit = "CPU s of the main thread" if args.clock == "cpu" else "s"
    print(f"| image | state + question tokens | cached ({unit}) | floor | cached / floor (bar <= 1.1) |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        fmt = lambda xs: f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"  # noqa: E731
        print(f"| {r['image']} | {r['state_tokens']} + {r['question_tokens']} | {fmt(r['cached'])} | {fmt(r['floor'])} "
              f"| {r['ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
