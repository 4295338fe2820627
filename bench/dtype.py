#!/usr/bin/env python3
"""bfloat16 against float32 on this machine, per phase: what `--dtype auto` should choose.

    python bench/dtype.py                      # the Qwen3-VL-2B architecture, random weights (~10 minutes on a CPU)
    python bench/dtype.py --config small       # the tiny test model: checks that it runs

Phases: caching an image (vision encoder + prefill), a question's prefill (time to first token from a state),
and decode at batch 1 and 8 in seconds a token for vlcache, transformers' `generate` and a bare forward (one
model call per token on a plain DynamicCache: the floor). Each dtype runs in its own process. Writes
docs/benchmarks-dtype.md and .json (or --out-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import QUESTIONS, SYSTEM  # noqa: E402 - bench/run.py: the same questions in every benchmark


def _median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: dict) -> dict:
    """Every phase in one dtype, in this process."""
    import torch
    from transformers import DynamicCache

    from vlcache import Engine

    engine = Engine.load(args["model"], device="cpu", dtype=args["dtype"])
    model, runs, k = engine.model, args["runs"], args["tokens"]
    out = {"dtype": args["dtype"]}
    # 1. Caching an image: vision encoder + prefill over system prompt and image.
    start = time.perf_counter()
    state = engine.cache_image(args["image"], system_prompt=SYSTEM, max_pixels=args["max_pixels"])
    out["cache_image_s"] = time.perf_counter() - start
    out["prefix_tokens"] = state.num_tokens
    # 2. A question's prefill: time to first token from the state.
    engine.ask(state, QUESTIONS[0], max_new_tokens=1, temperature=0)  # warm-up
    out["question_ttft_s"] = statistics.median(
        engine.ask(state, QUESTIONS[1], max_new_tokens=1, temperature=0).timings["ttft_s"] for _ in range(runs))
    # 3. Decode, vlcache: seconds a token after the first, batch 1 and 8.
    b1 = [engine.ask(state, QUESTIONS[2], max_new_tokens=k + 1, temperature=0) for _ in range(runs)]
    out["vlcache_b1_s_per_token"] = statistics.median(a.timings["decode_s"] / (len(a.token_ids) - 1) for a in b1)
    b8 = [engine.ask_many(state, QUESTIONS, max_new_tokens=k + 1, temperature=0) for _ in range(runs)]
    out["vlcache_b8_s_per_step"] = statistics.median(a[0].timings["decode_s"] / k for a in b8)

    # 4. transformers and the bare forward decode from the same prefix K/V (text positions: timing only).
    ids = torch.cat([state.input_ids, engine.question_ids(state.metadata.messages, QUESTIONS[2])], dim=1)

    def prefilled(batch: int) -> DynamicCache:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    for batch in (1, 8):
        base = prefilled(batch)
        rows = ids.expand(batch, -1)

        def generate(n: int) -> float:
            cache = _copy(base)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), past_key_values=cache,
                               max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - start

        generate(2)  # warm-up
        long = statistics.median(generate(k + 1) for _ in range(runs))
        short = statistics.median(generate(1) for _ in range(runs))
        out[f"transformers_b{batch}_s_per_token"] = (long - short) / k

        def bare() -> None:
            cache = _copy(base)
            token = rows[:, -1:]
            with torch.inference_mode():
                for step in range(k):
                    n = cache.get_seq_length()
                    pos = torch.full((batch, 1), n).view(1, batch, 1).expand(4, batch, 1)
                    logits = model(input_ids=token, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1).logits
                    token = logits[:, -1].argmax(-1, keepdim=True)

        out[f"bare_b{batch}_s_per_token"] = _median_time(bare, runs) / k
    return out


def _copy(cache):
    import copy

    return copy.deepcopy(cache)


def cpu_facts() -> dict:
    from run import machine  # bench/run.py: the one place that reads the CPU's name and features

    m = machine()
    return {"cpu": m["cpu"], "capability": m["cpu_capability"], "native_bf16": m["native_bf16"], "cores": m["cores"],
            "torch": m["torch"]}


def markdown(results: dict) -> str:
    facts, rows = results["machine"], results["dtypes"]
    by = {r["dtype"]: r for r in rows}
    lines = [
        "# bfloat16 vs float32, per phase",
        "",
        f"CPU: {facts['cpu']}, {facts['cores']} cores, torch capability **{facts['capability']}**, native bfloat16: "
        f"**{facts['native_bf16'] or 'none'}**. torch {facts['torch']}. Model: {results['model_label']}. "
        f"Image: {results['image']} at --max-pixels {results['max_pixels']} ({rows[0]['prefix_tokens']} prefix tokens). "
        f"Medians of {results['runs']} runs; decode over {results['tokens']} tokens.",
        "",
        f"Command: `{results['command']}`",
        "",
        "| phase | " + " | ".join(r["dtype"] for r in rows) + " | bfloat16 / float32 |",
        "| --- | " + " | ".join("---" for _ in rows) + " | --- |",
    ]
    phases = [
        ("caching the image (vision + prefill), s", "cache_image_s"),
        ("question prefill + first token from a state, s", "question_ttft_s"),
        ("decode batch 1, vlcache, s/token", "vlcache_b1_s_per_token"),
        ("decode batch 1, transformers generate, s/token", "transformers_b1_s_per_token"),
        ("decode batch 1, bare forward, s/token", "bare_b1_s_per_token"),
        ("decode batch 8, vlcache, s/step", "vlcache_b8_s_per_step"),
        ("decode batch 8, transformers generate, s/step", "transformers_b8_s_per_token"),
        ("decode batch 8, bare forward, s/step", "bare_b8_s_per_token"),
    ]
    for label, key in phases:
        cells = [f"{r[key]:.3f}" for r in rows]
        ratio = f"{by['bfloat16'][key] / by['float32'][key]:.2f}x" if {"bfloat16", "float32"} <= by.keys() else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("full", "small"), default="full")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8, help="decode steps timed")
    parser.add_argument("--max-pixels", type=int, default=384 * 384, help="image size (default: 144 image tokens)")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "vlcache-bench"))
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one dtype, JSON args
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    sys.path.insert(0, str(REPO / "src"))
    from vlcache.testing import build_random_checkpoint, build_tiny_checkpoint

    work = Path(args.work_dir)
    folder = work / ("qwen3-vl-2b-random" if args.config == "full" else "tiny-qwen3-vl")
    if not (folder / "model.safetensors").exists():
        if args.config == "full":
            build_random_checkpoint(SHARED / "models" / "qwen3-vl-2b-instruct" / "config.json", folder)
        else:
            build_tiny_checkpoint(folder)
    image = SHARED / "images" / "astronaut.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    rows = []
    for dtype in ("bfloat16", "float32"):
        print(f"measuring {dtype} ...", file=sys.stderr)
        job = {"model": str(folder), "dtype": dtype, "image": str(image), "max_pixels": args.max_pixels,
               "runs": args.runs, "tokens": args.tokens}
        done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"error: measuring {dtype} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {"machine": cpu_facts(), "dtypes": rows, "runs": args.runs, "tokens": args.tokens, "image": image.name,
               "max_pixels": args.max_pixels, "command": "python bench/dtype.py " + " ".join(argv or sys.argv[1:]),
               "model_label": "Qwen3-VL-2B architecture, random weights" if args.config == "full" else "tiny test model"}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks-dtype.json").write_text(json.dumps(results, indent=2))
    (out / "benchmarks-dtype.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
